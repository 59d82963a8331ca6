"""What ``logitcache.__all__`` promises: every name resolves, is the kind of thing its name says,
and stays that thing after its subpackage is imported (a function named like a submodule is
replaced by the module on ``import logitcache.<name>``: "'module' object is not callable")."""

from __future__ import annotations

import inspect
import pkgutil
import subprocess
import sys

import pytest

import logitcache


def _kind(name: str) -> str:
    """What the naming convention promises: CapWords are classes, lower_case are functions."""
    if name.startswith("__"):
        return "value"
    return "class" if name[0].isupper() else "function"


@pytest.mark.parametrize("name", logitcache.__all__)
def test_every_public_name_is_the_kind_its_name_says(name: str) -> None:
    value = getattr(logitcache, name)
    kind = _kind(name)
    if kind == "class":
        assert inspect.isclass(value), f"{name} is {type(value).__name__}, expected a class"
    elif kind == "function":
        assert callable(value) and not inspect.isclass(value) and not inspect.ismodule(value), (
            f"{name} is {type(value).__name__}, expected a function"
        )
    else:
        assert isinstance(value, str), name


def test_errors_are_exceptions() -> None:
    assert issubclass(logitcache.LogitCacheError, Exception)


def test_no_public_name_is_a_submodule_name() -> None:
    modules = {m.name for m in pkgutil.iter_modules(logitcache.__path__)}
    clash = sorted(set(logitcache.__all__) & modules)
    assert clash == [], f"public names shadowed by a submodule on import: {clash}"


@pytest.mark.parametrize(
    ("imports", "name"),
    [
        ("import logitcache.train", "run_train"),
        ("from logitcache.train import TrainConfig", "run_train"),  # what the CLI itself runs
        ("import logitcache.dump", "run_dump"),
        ("from logitcache.dump import DumpConfig", "run_dump"),
    ],
)
def test_stage_functions_stay_callable_after_their_package_is_imported(
    imports: str, name: str
) -> None:
    code = f"import logitcache; {imports}; f = logitcache.{name}; print(callable(f), type(f))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("True"), out.stdout


def test_import_is_light() -> None:
    code = "import sys, logitcache; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
