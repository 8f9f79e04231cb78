"""What a training path cost: wall time, device time, peak memory, tokens, and estimated FLOPs.

FLOPs follow Kaplan et al. (2020): a forward pass costs 2N + 2 L T d per token (N non-embedding parameters,
L layers, d the hidden size, T the mean sequence length: the attention term), a training pass (forward and
backward) three times that. Stages record in summary.json how many tokens went through training passes and
how many through forward-only passes (a DPO reference, PPO's sampling, reference and reward passes), and the
shapes of the models that saw them.
"""

from __future__ import annotations

from typing import Any


def forward_flops_per_token(params: float, layers: int, hidden: int, context: float) -> float:
    return 2.0 * params + 2.0 * layers * context * hidden


def estimate_flops(compute: dict[str, Any]) -> float:
    """compute: {params, layers, hidden, context, train_tokens, forward_tokens, extra: [{params, layers, hidden, context, tokens}]}."""
    per_token = forward_flops_per_token(compute["params"], compute["layers"], compute["hidden"], compute["context"])
    flops = 3.0 * per_token * compute.get("train_tokens", 0) + per_token * compute.get("forward_tokens", 0)
    for other in compute.get("extra", []):
        flops += forward_flops_per_token(other["params"], other["layers"], other["hidden"], other["context"]) * other["tokens"]
    return flops


def model_shape(model: Any) -> dict[str, float]:
    """Non-embedding parameters (4-bit weights counted as weights), layers and hidden size of a model."""
    from dpo_cli.models.build import base_model, count_parameters

    base = base_model(model)
    config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    _, total = count_parameters(base)
    embeddings = base.get_input_embeddings().weight.numel()
    output = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if output is not None and output.weight is not base.get_input_embeddings().weight:
        embeddings += output.weight.numel()
    return {"params": float(total - embeddings), "layers": int(config.num_hidden_layers), "hidden": int(config.hidden_size)}


def path_cost(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """The cost of a training path: its stages' costs added up (peak memory: the largest)."""
    cost: dict[str, Any] = {"wall_time_s": 0.0, "train_time_s": 0.0, "peak_memory_bytes": 0, "tokens": 0, "flops": 0.0, "devices": []}
    for summary in summaries:
        cost["wall_time_s"] += summary.get("wall_time_s", 0.0)
        cost["train_time_s"] += summary.get("train_time_s", 0.0)
        cost["peak_memory_bytes"] = max(cost["peak_memory_bytes"], summary.get("peak_memory_bytes", 0))
        cost["tokens"] += summary.get("tokens", 0)
        if summary.get("compute"):
            cost["flops"] += estimate_flops(summary["compute"])
        if summary.get("device") and summary["device"] not in cost["devices"]:
            cost["devices"].append(summary["device"])
    return cost
