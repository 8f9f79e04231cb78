"""Built-in demo datasets, addressed in recipes as `demo:NAME` (optionally `demo:NAME?n=2000&seed=3`, and
`&sentiment=positive` or `negative` for reviews of one sentiment only).

    demo:reviews    {text}                       full reviews, for pretraining
    demo:sft        {prompt, completion}         review opening -> continuation
    demo:sft-chat   {messages}                   the same as a user/assistant conversation
    demo:prompts    {prompt}                     review openings, for sampling preferences
"""

from __future__ import annotations

from urllib.parse import parse_qsl

from dpo_cli.demo.reviews import reviews
from dpo_cli.core.errors import UserError

# Each set has its own seed offset so that pretraining, SFT and prompt sets do not share reviews.
DEMO_SETS = {
    "reviews": (4000, 1000),
    "sft": (2000, 2000),
    "sft-chat": (2000, 2000),
    "prompts": (500, 3000),
}


def demo_rows(spec: str) -> list[dict]:
    """Rows of a `demo:NAME[?n=N&seed=S]` source."""
    name, _, query = spec.removeprefix("demo:").partition("?")
    if name not in DEMO_SETS:
        raise UserError(f"unknown demo dataset {spec!r}; demo sets: {', '.join('demo:' + k for k in DEMO_SETS)}")
    n, offset = DEMO_SETS[name]
    seed, sentiment = 0, None
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key == "sentiment" and value in ("positive", "negative"):
            sentiment = value
        elif key not in ("n", "seed") or not value.isdigit():
            raise UserError(f"{spec!r}: options are n=ROWS, seed=INT and sentiment=positive|negative, got {key}={value}")
        else:
            n, seed = (int(value), seed) if key == "n" else (n, int(value))
    items = reviews(n, seed + offset, sentiment)
    if name == "reviews":
        return [{"text": r["text"]} for r in items]
    if name == "sft":
        return [{"prompt": r["opening"], "completion": " " + r["continuation"]} for r in items]
    if name == "sft-chat":
        return [
            {
                "messages": [
                    {"role": "user", "content": f"Continue this movie review: {r['opening']}"},
                    {"role": "assistant", "content": r["continuation"]},
                ]
            }
            for r in items
        ]
    return [{"prompt": r["opening"]} for r in items]
