"""Promise: user code runs only where a recipe names it in a key that says so (`*python`), only from a file of
the user's own - never the standard library, a builtin, an installed package or dpo-cli itself, checked on the
object that will be called - and the stage says which function from which file it runs before it runs."""

from __future__ import annotations

import re
import sys

import pytest

from dpo_cli.core import ui
from dpo_cli.core.errors import UserError
from dpo_cli.eval.judges import build_judge
from dpo_cli.core.recipe_loader import load_recipe
from dpo_cli.core.sections import JudgeSpec
from helpers import write_recipe

# Every key that can name a judge: (stage, section, built-in key, python key, other keys the section needs).
JUDGE_KEYS = [
    ("collect-prefs", "label", "judge", "python", {"by": "judge"}),
    ("dpo", "policy_eval", "judge", "python", {"every": 5, "prompts": "demo:prompts"}),
    ("rm-train", "rm", "correlate_with", "correlate_with_python", {}),
    ("compare", "judges", "function", "python", {}),
    ("ppo", "ppo", "reward_judge", "reward_python", {}),
]

BASES = {
    "collect-prefs": {"model": {"name_or_path": "m"}, "data": {"train": "demo:prompts"}},
    "dpo": {"model": {"name_or_path": "m"}, "data": {"train": "demo:preferences"}},
    "rm-train": {"model": {"name_or_path": "m"}, "data": {"train": "demo:preferences"}},
    "compare": {"policies": {"a": "m"}, "data": {"train": "demo:prompts"}},
    "ppo": {"model": {"name_or_path": "m"}, "data": {"train": "demo:prompts"}},
}


def recipe_error(tmp_path, stage, section, keys) -> str:
    path = write_recipe(tmp_path / f"{stage}.yaml", {"stage": stage, **BASES[stage], section: keys})
    with pytest.raises(UserError) as caught:
        load_recipe(path, stage)
    return str(caught.value)


@pytest.mark.parametrize("stage, section, builtin_key, python_key, needs", JUDGE_KEYS, ids=[k[1] for k in JUDGE_KEYS])
def test_a_function_in_a_judge_key_is_refused_with_where_it_goes(tmp_path, stage, section, builtin_key, python_key, needs):
    message = recipe_error(tmp_path, stage, section, {**needs, builtin_key: "pydoc:pipepager"})
    assert f"{section}.{builtin_key}: 'pydoc:pipepager' is user code: name it in {section}.{python_key}" in message
    message = recipe_error(tmp_path, stage, section, {**needs, builtin_key: "length", python_key: "mine:score"})
    assert f"{section}.{builtin_key} ('length') and {section}.{python_key} ('mine:score') both name a judge" in message
    message = recipe_error(tmp_path, stage, section, {**needs, python_key: "not a function"})
    assert f"{section}.{python_key}: 'not a function' is not 'module:function'" in message
    path = write_recipe(tmp_path / "ok.yaml", {"stage": stage, **BASES[stage], section: {**needs, python_key: "mine:score"}})
    spec = getattr(load_recipe(path, stage), section).chosen_judge()
    assert spec == JudgeSpec(builtin=None, python="mine:score", key=f"{section}.{python_key}")


SNEAKY = """
import functools
import subprocess
import unittest
import torch.hub
from subprocess import getoutput as score
from torch.hub import load
from dpo_cli.core.atomic import atomic_write_text

run = exec
later = functools.partial(subprocess.getoutput, "id")


class Case(unittest.TestCase):  # calling an instance runs unittest's __call__, not this file's code
    pass


class Mine:
    def __call__(self, prompt, response):
        return 1.0


case = Case()
mine = Mine()
"""


@pytest.mark.parametrize(
    "spec, why",
    [
        ("pydoc:pipepager", "is in Python's standard library"),
        ("os:system", "is in Python's standard library"),
        ("builtins:eval", "is in Python's standard library"),
        ("subprocess:getoutput", "is in Python's standard library"),
        ("torch.hub:load", "is in an installed package"),
        ("pexpect:run", "is in an installed package"),
        ("pandas:read_pickle", "is in an installed package"),
        ("_pytest.logging:_FileHandler", "is in an installed package"),
        ("dpo_cli.core.atomic:atomic_write_text", "is in dpo-cli itself"),
        ("dpo_cli.models.io:save_final", "is in dpo-cli itself"),  # every package of it, not only the one user_code lives in
        ("sneaky:score", "resolves to subprocess in the Python installation"),  # a user module re-exporting the stdlib
        ("sneaky:load", "resolves to torch.hub in an installed package"),  # ... or an installed package
        ("sneaky:atomic_write_text", "resolves to dpo_cli.core.atomic in dpo-cli itself"),  # ... or dpo-cli
        ("sneaky:run", "is builtins.builtin_function_or_method, not a function of yours"),  # a builtin bound in a user module
        ("sneaky:later", "is functools.partial, not a function of yours"),
        ("sneaky:Mine", "is a class"),
        ("sneaky:case", "resolves to unittest.case in the Python installation"),  # __call__ inherited from the stdlib
    ],
)
def test_only_code_in_the_users_own_files_is_user_code(tmp_path, monkeypatch, spec, why):
    (tmp_path / "sneaky.py").write_text(SNEAKY)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    with pytest.raises(UserError, match=f"^judges.python: '{re.escape(spec)}' {why}"):
        build_judge(JudgeSpec(builtin=None, python=spec, key="judges.python"))


def test_user_functions_methods_and_callable_objects_run(tmp_path, monkeypatch):
    (tmp_path / "own_judges.py").write_text(SNEAKY + "\ndef plain(prompt, response):\n    return 2.0\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    for spec, score in [("own_judges:plain", 2.0), ("own_judges:mine", 1.0), ("own_judges:mine.__call__", 1.0)]:
        judge = build_judge(JudgeSpec(builtin=None, python=spec, key="judges.python"))
        assert judge.score(["p"], ["r"]).values == [score]


def test_an_installed_package_is_refused_before_its_first_line_runs(tmp_path, monkeypatch):
    installed = tmp_path / "lib" / "site-packages" / "evil_judges"
    installed.mkdir(parents=True)
    canary = tmp_path / "imported"
    (installed / "__init__.py").write_text(f"open({str(canary)!r}, 'w').close()\ndef score(p, r):\n    return 1.0\n")
    monkeypatch.setattr(sys, "path", [str(installed.parent), *sys.path])
    with pytest.raises(UserError, match="^label.python: 'evil_judges:score' is in an installed package"):
        build_judge(JudgeSpec(builtin=None, python="evil_judges:score", key="label.python"))
    assert not canary.exists() and "evil_judges" not in sys.modules


def test_a_user_module_that_exits_at_import_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "quits.py").write_text("import sys\nsys.exit(3)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    with pytest.raises(UserError, match=r"^label.python: importing module 'quits' called sys.exit\(3\)"):
        build_judge(JudgeSpec(builtin=None, python="quits:score", key="label.python"))


def test_a_stage_says_which_user_code_it_runs_and_refuses_the_rest_before_anything_runs(tmp_path, cli, tiny_model_dir, monkeypatch):
    (tmp_path / "explicit_judges.py").write_text("def exclaim(prompt, response):\n    return float(response.count('!'))\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))

    def recipe(label):
        return write_recipe(tmp_path / "prefs.yaml", {
            "stage": "collect-prefs", "model": {"name_or_path": str(tiny_model_dir)},
            "data": {"train": "demo:prompts?n=4", "max_length": 48}, "generation": {"max_new_tokens": 4}, "label": label,
        })  # fmt: skip

    from dpo_cli.stages import collect_prefs

    sample_candidates, events = collect_prefs.sample_candidates, []
    monkeypatch.setattr(ui, "note", lambda message: events.append(message) or print(message, file=sys.stderr))
    monkeypatch.setattr(collect_prefs, "sample_candidates", lambda *a: events.append("sampling") or sample_candidates(*a))

    code, _, err = cli("collect-prefs", recipe({"python": "pydoc:pipepager"}), "--run-dir", tmp_path / "refused")
    assert code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "label.python: 'pydoc:pipepager' is in Python's standard library" in err
    assert "sampling" not in events and not (tmp_path / "refused").exists()

    code, _, err = cli("collect-prefs", recipe({"python": "explicit_judges:exclaim"}), "--run-dir", tmp_path / "run")
    assert code == 0, err
    said = f"running user code exclaim from {tmp_path / 'explicit_judges.py'}"
    assert said in err and events.index(said) < events.index("sampling")  # at the start, before the policy samples
