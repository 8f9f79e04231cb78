"""Write the demo's results into README.md (between its demo markers) and its plots into docs/images, from
the comparison `make demo` just made: the README's numbers are always this code's.

    python scripts/demo_readme.py [RUN_DIR [README [IMAGES]]]   # default runs/demo, README.md, docs/images
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from dpo_cli.core.atomic import atomic_write_text
from dpo_cli.core.ui import human_count
from dpo_cli.pipeline import expand, load_pipeline, order, run_names
from dpo_cli.eval.report import HEADERS, _fmt, _interval, _train_time, _markdown_table, _rows, _trajectory_lines

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- demo results: written by make demo (scripts/demo_readme.py) -->", "<!-- end of demo results -->"
PLOTS = {"frontier.png": "demo-frontier.png", "over-optimisation.png": "demo-over-optimisation.png", "costs.png": "demo-costs.png"}


def section(run_dir: Path) -> str:
    result = json.loads((run_dir / "compare" / "report.json").read_text())
    pipeline = load_pipeline(ROOT / "recipes" / "demo" / "pipeline.yaml")  # its runs only, not older layouts' dirs beside them
    runs = run_names(pipeline, expand(pipeline, order(pipeline), smoke=run_dir.name.endswith("-smoke")))
    summaries = [json.loads((run_dir / name / "summary.json").read_text()) for name in runs if (run_dir / name / "summary.json").is_file()]
    minutes = sum(s.get("wall_time_s", 0.0) for s in summaries) / 60
    seeds = sorted({s["seeds"] for s in result["policies"].values()})
    lines = [
        BEGIN,
        "",
        f"A real run on the 2-core CPU machine: {len(summaries)} runs, {minutes:.0f} minutes in all (summed from their summaries); "
        f"{result['prompts']} held-out prompts; policies trained with {max(seeds)} seeds are reported over them.",
        "",
        _markdown_table(HEADERS, _rows(result)),
        "",
    ]
    if result.get("ceiling"):
        ceiling = result["ceiling"]
        lines.append(f"Ceiling (the generator's own positive reviews): {ceiling['mean']:.3f}. Length slope of the ground truth: {_fmt(result.get('length_slope'), 4)} per token.")
        lines.append("")
    baseline = result["baseline"]
    lines += ["What the intervals allow (a − b, runs paired by seed):", ""]
    for pair in result["differences"]:
        if baseline in (pair["a"], pair["b"]) and pair["b"] != "ppo-overoptimised" and pair["a"] != "ppo-overoptimised":
            continue  # against the SFT model every aligned policy wins: the table says so
        lines.append(f"- {pair['conclusion']}; KL {_interval(pair.get('kl'), True)}")
    lines += [""] + [line for line in _trajectory_lines(result) if not line.startswith("- Evaluated while")]
    if result["costs"]:
        rows = [
            [name, ", ".join(cost["runs"]), _train_time(cost), f"{cost['flops']:.3g}", human_count(cost["tokens"]), ", ".join(cost.get("models", [])) or "-",
             human_count(cost.get("samples", 0))]
            for name, cost in result["costs"].items()
        ]  # fmt: skip
        headers = ["path", "runs (one training of each)", "train time (s)", "est. FLOPs", "tokens", "models held while training", "samples generated"]
        lines += ["", _markdown_table(headers, rows)]
    warnings = result.get("confounds") or []
    lines += [""] + [f"Not like for like: {w}." for w in warnings] + ([""] if warnings else [])
    lines += [f"![{Path(target).stem}](docs/images/{target})" for source, target in PLOTS.items() if (run_dir / "compare" / source).is_file()]
    lines += ["", END]
    return "\n".join(lines) + "\n"


def main() -> None:
    run_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "runs" / "demo"
    readme = Path(sys.argv[2]) if len(sys.argv) > 2 else ROOT / "README.md"
    images = Path(sys.argv[3]) if len(sys.argv) > 3 else ROOT / "docs" / "images"
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{readme}: the demo markers are missing ({BEGIN} ... {END})")
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    atomic_write_text(readme, head + section(run_dir).rstrip("\n") + tail)
    for source, target in PLOTS.items():
        if (run_dir / "compare" / source).is_file():
            shutil.copyfile(run_dir / "compare" / source, images / target)
    print(f"{readme}: the demo results of {run_dir} written; plots in {images}")


if __name__ == "__main__":
    main()
