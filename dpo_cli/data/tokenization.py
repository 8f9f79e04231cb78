"""Tokenizers: loading, training a byte-level BPE from a corpus, pad tokens and the default chat template."""

from __future__ import annotations

from collections.abc import Iterable

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from dpo_cli.core.errors import UserError

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"

# Used only when a tokenizer has no chat template of its own (documented in docs/recipes.md).
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, model_max_length: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2 style: no unknown tokens) trained on `texts`; deterministic for the same texts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=model_max_length,
    )


def load_tokenizer(name_or_path: str, revision: str | None, trust_remote_code: bool) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"cannot load a tokenizer from {name_or_path!r}: not a local tokenizer folder and not reachable on the hub ({first})"
        ) from None


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """Give the tokenizer a pad token if it has none; returns a note for the user, or None."""
    if tokenizer.pad_token_id is not None:
        return None
    if tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
        return f"the tokenizer has no pad token; using its EOS token {tokenizer.eos_token!r} for padding (padding is masked)"
    tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    return f"the tokenizer has no pad or EOS token; added {PAD_TOKEN!r}"


def ensure_chat_template(tokenizer: PreTrainedTokenizerBase, override: str | None) -> str | None:
    """Install the recipe's chat template, or the default one where the tokenizer has none; returns a note."""
    if override is not None:
        from dpo_cli.data.chat_templates import chat_template_text

        tokenizer.chat_template = chat_template_text(override)
        return None
    if getattr(tokenizer, "chat_template", None):
        return None
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return "the tokenizer has no chat template; using dpo-cli's simple default (<|role|>\\ncontent<eos>, see docs/recipes.md)"


def chat_template_notes(tokenizer: PreTrainedTokenizerBase, override: str | None, prompts: list) -> list[str]:
    """Prompts given as conversations need a chat template: the recipe's, the tokenizer's, or the default."""
    if not any(isinstance(prompt, list) for prompt in prompts):
        return []
    note = ensure_chat_template(tokenizer, override)
    return [note] if note else []
