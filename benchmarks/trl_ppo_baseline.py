"""One run of TRL 1.12's PPOTrainer (trl.experimental.ppo, the last release that has one) on a benchmark workload,
for `make bench` to set beside dpo-cli's ppo. It runs in its own environment (.venv-trl112, `make bench-env`):
later TRL releases dropped the trainer. The prompts come tokenised by dpo-cli (bench.py writes their ids), so
both tools sample from the same tokens.

    .venv-trl112/bin/python benchmarks/trl_ppo_baseline.py CONFIG.json  ->  one JSON line: seconds, episodes, peak memory
"""

from __future__ import annotations

import json
import resource
import sys
import time

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from trl.experimental.ppo import PPOConfig, PPOTrainer


def main() -> None:
    config = json.loads(open(sys.argv[1]).read())
    tokenizer = AutoTokenizer.from_pretrained(config["policy"], padding_side="left")
    prompts = [json.loads(line)["input_ids"] for line in open(config["prompts"])]
    data = Dataset.from_dict({"input_ids": prompts})
    args = PPOConfig(
        output_dir=config["output_dir"], per_device_train_batch_size=config["mini_batch_size"], gradient_accumulation_steps=1,
        num_mini_batches=config["batch_size"] // config["mini_batch_size"], local_rollout_forward_batch_size=config["batch_size"],
        total_episodes=config["iterations"] * config["batch_size"], num_ppo_epochs=config["ppo_epochs"], response_length=config["max_new_tokens"],
        temperature=1.0, stop_token="eos", kl_coef=0.05, vf_coef=0.1, cliprange=0.2, cliprange_value=0.2, gamma=1.0, lam=0.95,
        learning_rate=1e-5, lr_scheduler_type="linear", max_grad_norm=1.0, num_sample_generations=0, save_strategy="no", report_to=[],
        logging_steps=1, use_cpu=not torch.cuda.is_available(), bf16=config["bf16"], seed=config["seed"], gradient_checkpointing=False,
    )  # fmt: skip
    policy = AutoModelForCausalLM.from_pretrained(config["policy"])
    reference = AutoModelForCausalLM.from_pretrained(config["policy"])
    value = AutoModelForSequenceClassification.from_pretrained(config["reward_model"], num_labels=1)
    reward = AutoModelForSequenceClassification.from_pretrained(config["reward_model"], num_labels=1)
    trainer = PPOTrainer(
        args=args, processing_class=tokenizer, model=policy, ref_model=reference, reward_model=reward, value_model=value,
        train_dataset=data, eval_dataset=data,
    )  # fmt: skip
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": seconds, "episodes": args.total_episodes, "peak_memory_bytes": peak}))


if __name__ == "__main__":
    main()
