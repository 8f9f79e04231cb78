"""The layering rules of docs/architecture.md, checked on the source: no import cycle anywhere in dpo_cli/
(lazy imports inside functions count: they are the same dependency, only later), and no stage imports
another stage."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from helpers import REPO

PACKAGE = REPO / "dpo_cli"


def modules() -> dict[str, object]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        found[name] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the dpo_cli modules it imports (a `from package import name` counts the submodule name)."""
    names = modules()

    def owner(dotted: str) -> str | None:
        while dotted and dotted not in names:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    graph = {}
    for name, path in names.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {owner(alias.name) for alias in node.names if alias.name.startswith("dpo_cli")}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("dpo_cli"):
                imported |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in names else owner(node.module) for a in node.names}
        graph[name] = imported - {name, None}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import cycle, as the path that closes it (depth-first search, each cycle reported once)."""
    found, state, path = [], {}, []

    def visit(node: str) -> None:
        state[node], path[len(path):] = "open", [node]
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                found.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target)
        state[node] = "done"
        path.pop()

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_the_checker_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_dpo_cli_has_no_import_cycle():
    assert cycles(import_graph()) == []


def test_no_stage_imports_another_stage():
    shared = {"dpo_cli.stages"}  # the registry
    graph = import_graph()
    crossings = [
        f"{name} imports {target}"
        for name, targets in graph.items() if name.startswith("dpo_cli.stages.") and name not in shared
        for target in targets if target.startswith("dpo_cli.stages.") and target not in shared
    ]  # fmt: skip
    assert crossings == []


def test_the_cli_and_the_pipeline_sit_on_the_runner():
    graph = import_graph()
    assert "dpo_cli.runner" in graph["dpo_cli.cli"] and "dpo_cli.runner" in graph["dpo_cli.pipeline"]
    assert "dpo_cli.cli" not in graph["dpo_cli.pipeline"] and "dpo_cli.cli" not in graph["dpo_cli.runner"]


MODEL_BUILDING = ("ForCausalLM.from_pretrained", "ForSequenceClassification.from_pretrained", "from_config(", "LoraConfig(", "get_peft_model(", "BitsAndBytesConfig(", "PeftModel.")


def test_models_are_built_in_one_home():
    """Weights are loaded, quantized and given adapters or heads only in dpo_cli/models/: build.py (one model
    from a recipe section), roles.py (the models an algorithm runs) and io.py (final/ and frozen loads)."""
    home = {PACKAGE / "models" / name for name in ("build.py", "roles.py", "io.py")}
    found = [
        f"{path.relative_to(PACKAGE)} builds a model ({needle})"
        for path in sorted(PACKAGE.rglob("*.py")) if path not in home
        for needle in MODEL_BUILDING if needle in path.read_text()
    ]  # fmt: skip
    assert found == []


def test_tests_share_helpers_only_through_helpers_and_fixtures():
    """Helpers come from tests/helpers.py (and model_zoo.py), fixtures from conftest.py: no test imports
    conftest or another test file."""
    tests = Path(__file__).parent
    found = [
        f"{path.relative_to(tests)}: {line.strip()}"
        for path in sorted(tests.rglob("*.py"))
        for line in path.read_text().splitlines()
        if re.match(r"\s*(from|import)\s+(conftest|test_\w+|reliability)\b", line)
    ]  # fmt: skip
    assert found == []


# The layers, bottom up: a module imports from its own layer and the layers below (docs/architecture.md).
LAYERS = {"core": 0, "losses": 1, "data": 2, "models": 2, "demo": 2, "train": 3, "eval": 3, "stages": 4, "tools": 4, "runner": 5, "cli": 6, "pipeline": 6, "__main__": 7}


def layer_of(module: str) -> int:
    top = module.removeprefix("dpo_cli").lstrip(".").split(".")[0]
    return LAYERS.get(top, 0)  # the package itself (its version) is ground


def test_every_module_lives_in_a_layer():
    assert [m for m in import_graph() if m.count(".") >= 1 and m.split(".")[1] not in LAYERS] == []


def test_no_module_imports_a_layer_above_its_own():
    graph = import_graph()
    upward = [f"{name} imports {target}" for name, targets in graph.items() for target in targets if layer_of(target) > layer_of(name)]
    assert upward == []
