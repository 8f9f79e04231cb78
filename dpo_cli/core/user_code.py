"""The one place dpo-cli imports and calls code a recipe names (`module:function` in a `python` key).

User code is Python source in a file of the user's own: not Python's standard library, not a builtin or an
extension, not an installed package (site-packages, dist-packages, the interpreter's library folders) and
not dpo-cli itself. A shared recipe therefore cannot make a stage call `os:system`, `torch.hub:load` or
`pandas:read_pickle`, nor a user module that merely re-exports one. The check is made on the object that
will actually be called - a plain function, a bound method, or an instance whose class defines `__call__` -
and an installed package is refused before it is imported, so its import-time code never runs either.
To use a judge from an installed package, wrap it in a function in a file of yours: that is the opt-in.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import site
import sys
import sysconfig
import types
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import dpo_cli
from dpo_cli.core.errors import UserError

_INSTALLED_MARKERS = ("site-packages", "dist-packages")


@lru_cache(maxsize=1)
def _library_folders() -> tuple[str, ...]:
    """Folders whose Python files are the interpreter's or installed packages', never the user's."""
    paths = sysconfig.get_paths()
    folders = {paths[name] for name in ("stdlib", "platstdlib", "purelib", "platlib") if name in paths}
    folders.update(site.getsitepackages() if hasattr(site, "getsitepackages") else [])
    folders.add(site.getusersitepackages())
    folders.add(os.path.dirname(os.path.abspath(dpo_cli.__file__)))  # the whole dpo_cli package, wherever it is installed
    return tuple(sorted({os.path.realpath(folder) for folder in folders if folder}))


def whose(file: str | None) -> str | None:
    """None when `file` (or a namespace package's folder) is the user's own; otherwise where it is instead."""
    if not file or file.startswith("<") or not os.path.exists(file):
        return "not in a Python source file"
    real = os.path.realpath(file)
    if any(marker in real.split(os.sep) for marker in _INSTALLED_MARKERS):
        return f"in an installed package ({real})"
    for folder in _library_folders():
        if real == folder or real.startswith(folder + os.sep):
            own = folder.endswith(os.sep + "dpo_cli")
            return f"in dpo-cli itself ({real})" if own else f"in the Python installation ({real})"
    return None


def _module_problem(module_name: str) -> str | None:
    """Why the top-level package of `module_name` is not the user's, found without importing it; None if it is
    (or cannot be found, which the import then says)."""
    top = module_name.split(".")[0]
    if top in sys.stdlib_module_names or top in sys.builtin_module_names or top == "builtins":
        return "is in Python's standard library"
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    locations = [spec.origin] if spec.origin and spec.has_location else list(spec.submodule_search_locations or [])
    if spec.origin in ("built-in", "frozen"):
        return "is a module built into Python"
    problems = [whose(location) for location in locations]
    return next((f"is {problem}" for problem in problems if problem), None)


def _called_code(target: Any) -> tuple[types.FunctionType | None, str]:
    """The Python function that calling `target` runs, and what kind of object it is."""
    if inspect.isclass(target):
        return None, "a class (calling it builds an object, not a score)"
    if isinstance(target, types.MethodType):
        function = target.__func__
        return (function if isinstance(function, types.FunctionType) else None), "a method"
    if isinstance(target, types.FunctionType):
        return target, "a function"
    call = inspect.getattr_static(type(target), "__call__", None)
    if isinstance(call, types.FunctionType):
        return call, f"an instance of {type(target).__qualname__}"
    return None, f"{type(target).__module__}.{type(target).__qualname__}"


def load_user_function(spec: str, key: str, announce: Callable[[str], None]) -> Callable[..., Any]:
    """`module:function` named by recipe key `key`, imported from the current directory or the Python path
    once it is known to be a file of the user's own; `announce` is told what runs, from which file, before
    the module's first line does."""
    module_name, _, function_name = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    problem = _module_problem(module_name)
    if problem:
        raise UserError(f"{key}: {spec!r} {problem}, not a judge of yours; name a function in a .py file of your own")
    try:
        found = importlib.util.find_spec(module_name)  # imports a dotted name's parent packages (checked above)
        module_file = found.origin if found is not None else None
    except Exception:
        module_file = None
    if module_file is not None and whose(module_file):
        raise UserError(f"{key}: module {module_name!r} is {whose(module_file)}, not a judge of yours; name a function in a .py file of your own")
    announce(f"running user code {function_name} from {module_file or module_name}")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # the user's module failed at import: say so in one line
        raise UserError(f"{key}: cannot import module {module_name!r} ({type(exc).__name__}: {exc})") from None
    except SystemExit as exc:
        raise UserError(f"{key}: importing module {module_name!r} called sys.exit({exc.code!r})") from None
    target: Any = module
    for part in function_name.split("."):
        target = getattr(target, part, None)
    if not callable(target):
        raise UserError(f"{key}: module {module_name!r} has no function {function_name!r}")
    code, kind = _called_code(target)
    if code is None:
        raise UserError(f"{key}: {spec!r} is {kind}, not a function of yours; name a plain function (prompt, response) -> float")
    problem = whose(code.__code__.co_filename)
    if problem:
        where = getattr(code, "__module__", None) or "code"
        raise UserError(f"{key}: {spec!r} resolves to {where} {problem}, not to Python code of yours; name your own module:function")
    return target
