"""What a training path cost: wall time, device time, peak memory, tokens, and estimated FLOPs.

FLOPs follow Kaplan et al. (2020): a forward pass costs 2N + 2 L T d per token (N non-embedding parameters,
L layers, d the hidden size, T the mean sequence length: the attention term). A training pass adds the
backward: the gradient through the activations (2N, and twice the attention term) and the weight gradients
of the weights that train (2N_trained): 6N + 6 L T d when every weight trains (Kaplan's three forwards),
4N + 2N_trained + 6 L T d over a frozen base (LoRA, whose adapters are N_trained). Stages record in summary.json how many tokens went through training passes and
how many through forward-only passes (a DPO reference, PPO's sampling, reference and reward passes), and the
shapes of the models that saw them.
"""

from __future__ import annotations

from typing import Any


def forward_flops_per_token(params: float, layers: int, hidden: int, context: float) -> float:
    return 2.0 * params + 2.0 * layers * context * hidden


def train_flops_per_token(params: float, trained: float, layers: int, hidden: float, context: float) -> float:
    """Forward and backward of one token (the module docstring): 3x the forward when trained == params."""
    return 4.0 * params + 2.0 * trained + 6.0 * layers * context * hidden


def estimate_flops(compute: dict[str, Any]) -> float:
    """compute: {params, trained, layers, hidden, context, train_tokens, forward_tokens, extra: [{params, layers,
    hidden, context, tokens}]}; `trained` (the non-embedding weights that train) defaults to params, as
    summaries written before it was recorded counted."""
    params, layers, hidden, context = compute["params"], compute["layers"], compute["hidden"], compute["context"]
    trained = compute.get("trained", params)
    flops = train_flops_per_token(params, trained, layers, hidden, context) * compute.get("train_tokens", 0)
    flops += forward_flops_per_token(params, layers, hidden, context) * compute.get("forward_tokens", 0)
    for other in compute.get("extra", []):
        flops += forward_flops_per_token(other["params"], other["layers"], other["hidden"], other["context"]) * other["tokens"]
    return flops


def model_shape(model: Any) -> dict[str, float]:
    """Non-embedding parameters (4-bit weights counted as weights), how many of them train (a LoRA run's
    adapters; all of a full run's), layers and hidden size of a model."""
    from dpo_cli.models.build import base_model, count_parameters

    base = base_model(model)
    config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    trainable, total = count_parameters(base)
    embedding_weights = [base.get_input_embeddings().weight]
    output = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if output is not None and output.weight is not embedding_weights[0]:
        embedding_weights.append(output.weight)
    embeddings = sum(weight.numel() for weight in embedding_weights)
    trained = trainable - sum(weight.numel() for weight in embedding_weights if weight.requires_grad)
    return {"params": float(total - embeddings), "trained": float(trained), "layers": int(config.num_hidden_layers), "hidden": int(config.hidden_size)}


def path_cost(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """The cost of a training path: its stages' costs added up (peak memory: the largest)."""
    return add_costs([run_cost(summary) for summary in summaries])


def run_cost(summary: dict[str, Any]) -> dict[str, Any]:
    """One stage run's cost, from its summary.json: also the models it held while training (its `models`:
    policy, reference, critic, reward model) and the responses it sampled to learn from (PPO's episodes,
    collect-prefs's samples, whose sampling FLOPs its `compute` holds)."""
    return {
        "wall_time_s": summary.get("wall_time_s", 0.0),
        "train_time_s": summary.get("train_time_s", 0.0),
        "peak_memory_bytes": summary.get("peak_memory_bytes", 0),
        "tokens": summary.get("tokens", 0),
        "flops": estimate_flops(summary["compute"]) if summary.get("compute") else 0.0,
        "devices": [summary["device"]] if summary.get("device") else [],
        "models": list(summary.get("models", [])),
        "samples": summary.get("episodes", summary.get("samples", 0)),  # PPO's episodes; collect-prefs's sampled responses
    }


SUMMED = ("wall_time_s", "train_time_s", "tokens", "flops", "samples")


def add_costs(costs: list[dict[str, Any]]) -> dict[str, Any]:
    """Stages run one after the other: times, tokens, FLOPs and samples add up; peak memory and the models
    held at once are those of the largest stage."""
    total: dict[str, Any] = {"wall_time_s": 0.0, "train_time_s": 0.0, "peak_memory_bytes": 0, "tokens": 0, "flops": 0.0, "devices": [], "models": [], "samples": 0}
    for cost in costs:
        for key in SUMMED:
            total[key] += cost.get(key, 0)
        total["peak_memory_bytes"] = max(total["peak_memory_bytes"], cost["peak_memory_bytes"])
        total["devices"] += [d for d in cost["devices"] if d not in total["devices"]]
        if len(cost.get("models", [])) > len(total["models"]):
            total["models"] = list(cost["models"])
    return total


def mean_cost(costs: list[dict[str, Any]]) -> dict[str, Any]:
    """The same stage run several times (seeds): what one run costs on average."""
    total = add_costs(costs)
    times = [cost["train_time_s"] for cost in costs]
    # the spread shows how noisy one run's timing is (the same workload has taken 2-3x as long on a busy machine)
    return {**total, **{key: total[key] / len(costs) for key in SUMMED}, "train_time_s_range": [min(times), max(times)]}
