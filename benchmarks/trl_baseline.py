"""The same workload through Hugging Face TRL (SFTTrainer / DPOTrainer), for `make bench` to compare against.

    python benchmarks/trl_baseline.py CONFIG.json  ->  prints one JSON line: train seconds, items, peak memory
"""

from __future__ import annotations

import json
import resource
import sys

import torch
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    config = json.loads(open(sys.argv[1]).read())
    tokenizer = AutoTokenizer.from_pretrained(config["model"])
    model = AutoModelForCausalLM.from_pretrained(config["model"])
    data = load_dataset("json", data_files=config["data"], split="train")
    common = dict(
        output_dir=config["output_dir"],
        per_device_train_batch_size=config["batch_size"],
        max_steps=config["steps"],
        learning_rate=1e-4,
        logging_steps=5,
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        max_length=config["max_length"],
        dataloader_num_workers=0,
    )
    if config["stage"] == "dpo":
        from trl import DPOConfig, DPOTrainer

        trainer = DPOTrainer(model=model, args=DPOConfig(beta=0.1, **common), train_dataset=data, processing_class=tokenizer)
    else:
        from trl import SFTConfig, SFTTrainer

        trainer = SFTTrainer(model=model, args=SFTConfig(packing=False, **common), train_dataset=data, processing_class=tokenizer)
    output = trainer.train()
    if torch.cuda.is_available():
        peak, kind = torch.cuda.max_memory_allocated(), "cuda_max_allocated"
    else:
        peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "cpu_max_rss"
    print(json.dumps({"train_seconds": output.metrics["train_runtime"], "items": config["steps"] * config["batch_size"], "peak_memory_bytes": peak, "peak_memory_kind": kind}))


if __name__ == "__main__":
    main()
