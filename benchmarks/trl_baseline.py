"""One TRL run of a benchmark workload (SFTTrainer, RewardTrainer or DPOTrainer), for `make bench` to set beside
dpo-cli's. Rows are read in file order (bench.py writes them in dpo-cli's training order), so both tools see
the same batches.

    python benchmarks/trl_baseline.py CONFIG.json  ->  one JSON line: train and precompute seconds, first loss, peak memory
"""

from __future__ import annotations

import json
import resource
import sys
import time

import datasets
import torch
from datasets import load_dataset
from torch.utils.data import SequentialSampler
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer


def main() -> None:
    config = json.loads(open(sys.argv[1]).read())
    datasets.disable_caching()  # TRL would otherwise find the reference log-probs of an earlier run in the cache
    stage, fastest = config["stage"], config["setting"] == "fastest"
    tokenizer = AutoTokenizer.from_pretrained(config["model"])
    data = load_dataset("json", data_files=config["data"], split="train")
    common = dict(
        output_dir=config["output_dir"], per_device_train_batch_size=config["batch_size"], max_steps=config["steps"],
        learning_rate=1e-4, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(), bf16=config["bf16"],
        max_length=config["max_length"], dataloader_num_workers=0, seed=config["seed"],
    )  # fmt: skip
    if stage != "dpo" or fastest:
        common["gradient_checkpointing"] = False  # TRL's default is on; its fastest setting turns it off
    precompute = {"seconds": 0.0}
    load, adapters = {}, {}
    if config["mode"] != "full":  # bench.py's MODES, as peft and bitsandbytes spell them
        from peft import LoraConfig

        lora = config["lora"]
        task = "SEQ_CLS" if stage == "rm" else "CAUSAL_LM"
        adapters["peft_config"] = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"], target_modules=lora["target_modules"], task_type=task)
    if config["mode"] == "qlora":
        from transformers import BitsAndBytesConfig

        compute = torch.bfloat16 if config["bf16"] else torch.float32
        load["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute)
    if stage == "dpo":
        from trl import DPOConfig, DPOTrainer

        original = DPOTrainer._precompute_ref_logps

        def timed(self, *args, **kwargs):  # the reference pass is work: it is timed like training
            started = time.perf_counter()
            try:
                return original(self, *args, **kwargs)
            finally:
                precompute["seconds"] += time.perf_counter() - started

        DPOTrainer._precompute_ref_logps = timed
        args = DPOConfig(beta=0.1, precompute_ref_log_probs=fastest, **common)
        model = AutoModelForCausalLM.from_pretrained(config["model"], **load)
        trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer, **adapters)
    elif stage == "rm":
        from trl import RewardConfig, RewardTrainer

        model = AutoModelForSequenceClassification.from_pretrained(config["model"], num_labels=1, **load)
        trainer = RewardTrainer(model=model, args=RewardConfig(center_rewards_coefficient=None, **common), train_dataset=data, processing_class=tokenizer, **adapters)
    else:
        from trl import SFTConfig, SFTTrainer

        model = AutoModelForCausalLM.from_pretrained(config["model"], **load)
        trainer = SFTTrainer(model=model, args=SFTConfig(packing=False, **common), train_dataset=data, processing_class=tokenizer, **adapters)
    trainer._get_train_sampler = lambda *args, **kwargs: SequentialSampler(trainer.train_dataset)
    output = trainer.train()
    key = "logps/chosen" if stage == "dpo" else "loss"  # bench.py's FIRST_STEP_KEY
    losses = [entry[key] for entry in trainer.state.log_history if key in entry]
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = {"train_seconds": output.metrics["train_runtime"], "precompute_seconds": precompute["seconds"], "first_loss": losses[0] if losses else None}
    print(json.dumps({**result, "peak_memory_bytes": peak}))


if __name__ == "__main__":
    main()
