"""The benchmark's fixed model and seeded synthetic data, shared by dpo-cli and TRL.

Two workloads: `short` (uniform rows of a few dozen tokens, like the demo) and `long` (chat rows whose lengths
follow a heavy-tailed, log-normal distribution, prompts longer than responses, as in UltraFeedback). Each data
file holds exactly the rows trained on (steps x batch), so a precomputed reference pass covers those and no more.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

# Model shapes (random weights, built from config): the CPU benchmark's, and Qwen2.5-0.5B's for a GPU.
SHAPES = {
    "tiny": {"hidden": 256, "intermediate": 1024, "layers": 4, "heads": 8, "kv_heads": 8, "vocab": 2048, "tied": False},
    "qwen2.5-0.5b": {"hidden": 896, "intermediate": 4864, "layers": 24, "heads": 14, "kv_heads": 2, "vocab": 151936, "tied": True},
}
TOKENIZER_VOCAB = 2048  # the BPE trained on demo reviews; a larger model vocabulary leaves the rest unused
# A chat template of plain-text markers (the tokenizer has no special tokens for turns); EOS ends a turn.
CHAT_TEMPLATE = (
    "{%- for message in messages %}{{- '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}{%- endif %}"
)


@dataclass(frozen=True)
class Workload:
    name: str
    max_length: int
    batch_size: int
    steps: int
    chat: bool
    prompt_tokens: tuple[float, int, int]  # log-normal median, lower and upper clip (long workload only)
    response_tokens: tuple[float, int, int]

    @property
    def rows(self) -> int:
        return self.steps * self.batch_size


WORKLOADS = {
    "short": Workload("short", 256, 8, 20, False, (0, 0, 0), (0, 0, 0)),
    "long": Workload("long", 512, 8, 10, True, (160.0, 24, 300), (60.0, 8, 200)),
    "gpu": Workload("gpu", 1024, 8, 10, True, (400.0, 48, 600), (150.0, 16, 400)),
}


def build_base_model(folder: Path, shape: str = "tiny") -> None:
    """A Llama (or, for the 0.5B shape, a Qwen2) with a BPE tokenizer trained on demo reviews: the fixed model
    every run starts from."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from dpo_cli.data.tokenization import train_bpe_tokenizer
    from dpo_cli.demo import demo_rows

    tokenizer = train_bpe_tokenizer([r["text"] for r in demo_rows("demo:reviews?n=2000")], TOKENIZER_VOCAB, 2048)
    tokenizer.chat_template = CHAT_TEMPLATE
    s = SHAPES[shape]
    config_class, model_class = (LlamaConfig, LlamaForCausalLM) if shape == "tiny" else (Qwen2Config, Qwen2ForCausalLM)
    config = config_class(
        vocab_size=max(len(tokenizer), s["vocab"]), hidden_size=s["hidden"], intermediate_size=s["intermediate"], num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"], tie_word_embeddings=s["tied"], max_position_embeddings=2048,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model_class(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def build_reward_init(base: Path, folder: Path) -> None:
    """The base with a seeded scalar score head: both tools' reward models start from these same weights."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_pretrained(base, num_labels=1).save_pretrained(folder)
    AutoTokenizer.from_pretrained(base).save_pretrained(folder)


def model_flops_per_token(base: Path) -> float:
    """2N: the forward FLOPs of one token, N = the parameters a token's matmuls touch (all but the input
    embedding). Training counts 3x this (forward and backward), a reference pass 1x; attention's T^2 is left out."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(base)
    kv = c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    per_layer = c.hidden_size * (2 * c.hidden_size + 2 * kv) + 3 * c.hidden_size * c.intermediate_size
    return 2.0 * (c.num_hidden_layers * per_layer + c.hidden_size * c.vocab_size)


def _text_of(tokenizer, rng: random.Random, tokens: int) -> str:
    """About `tokens` tokens of review prose, cut at a word."""
    from dpo_cli.demo.reviews import make_review

    text = ""
    while len(tokenizer(text)["input_ids"]) < tokens:
        text += make_review(rng)["text"] + " "
    ids = tokenizer(text)["input_ids"][:tokens]
    return tokenizer.decode(ids).rsplit(" ", 1)[0].strip()


def _length(rng: random.Random, spec: tuple[float, int, int]) -> int:
    median, low, high = spec
    return int(min(high, max(low, rng.lognormvariate(math.log(median), 0.6))))


def write_data(folder: Path, base: Path, workload: Workload) -> dict[str, Path]:
    """sft rows (prompt/completion) and preference pairs (prompt/chosen/rejected) of the workload, seeded."""
    from transformers import AutoTokenizer

    from dpo_cli.demo.reviews import make_review

    rng = random.Random(0)
    sft, pairs = [], []
    if workload.chat:
        tokenizer = AutoTokenizer.from_pretrained(base)
        user = lambda text: [{"role": "user", "content": text}]  # noqa: E731
        assistant = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731
        for _ in range(workload.rows):
            prompt = user(_text_of(tokenizer, rng, _length(rng, workload.prompt_tokens)))
            answers = [_text_of(tokenizer, rng, _length(rng, workload.response_tokens)) for _ in range(3)]
            sft.append({"prompt": prompt, "completion": assistant(answers[0])})
            pairs.append({"prompt": prompt, "chosen": assistant(answers[1]), "rejected": assistant(answers[2])})
    else:
        for _ in range(workload.rows):
            review, good, bad = make_review(rng), make_review(rng, "positive"), make_review(rng, "negative")
            sft.append({"prompt": review["opening"], "completion": " " + review["continuation"]})
            pairs.append({"prompt": good["opening"], "chosen": " " + good["continuation"], "rejected": " " + bad["continuation"]})
    files = {"sft": folder / f"{workload.name}-sft.jsonl", "pairs": folder / f"{workload.name}-pairs.jsonl"}
    for key, rows in (("sft", sft), ("pairs", pairs)):
        files[key].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return files


def in_training_order(path: Path, batch_size: int, seed: int) -> Path:
    """The rows in the order dpo-cli trains on them (its seeded epoch order), for a tool that reads in file order:
    both then see the same batches, and their first-step losses can be compared."""
    from datasets import Dataset

    from dpo_cli.train.loop import BatchStream

    rows = path.read_text().splitlines()
    stream = BatchStream(Dataset.from_dict({"i": list(range(len(rows)))}), batch_size, seed, lambda batch: [r["i"] for r in batch])
    order = [i for k in range(stream.per_epoch) for i in stream[k]]
    ordered = path.with_name(path.stem + "-ordered.jsonl")
    ordered.write_text("".join(rows[i] + "\n" for i in order))
    return ordered
