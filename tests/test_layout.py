"""The house rules of ``../shared/DESIGN.md``, kept by a test instead of by memory.

The measuring is ``scripts/check_layout.py`` (its docstring says how the import graph is built and
what counts as a cycle); this file asserts on the real package what the script prints, and checks
on a small fake package that the script does see a cycle, a forbidden import and a duplicated
rule (so a silent checker cannot pass these tests vacuously).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load_checker() -> ModuleType:
    spec = importlib.util.spec_from_file_location("check_layout", ROOT / "scripts/check_layout.py")
    if spec is None or spec.loader is None:
        raise ImportError("scripts/check_layout.py not found")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being created
    spec.loader.exec_module(module)
    return module


check_layout = _load_checker()


@pytest.fixture(scope="module")
def layout() -> Any:
    return check_layout.measure(ROOT)


def test_root_holds_at_most_eight_modules(layout: Any) -> None:
    root = layout.root_modules
    assert len(root) <= check_layout.MAX_ROOT_MODULES, root


def test_no_import_cycle(layout: Any) -> None:
    assert layout.cycles == [], layout.report()
    assert layout.cycles_top_level == []


@pytest.mark.parametrize(
    "rule",
    [
        "training_imports_dump",
        "format_imports_store",
        "loss_imports_store_or_format",
        "store_imports_upper",
        "imports_cli",
    ],
)
def test_imports_point_down_only(layout: Any, rule: str) -> None:
    offenders = layout.rules[rule]
    assert offenders == {}, "\n".join(f"{m}: {' -> '.join(c)}" for m, c in offenders.items())


def test_script_ends_with_the_json_summary() -> None:
    import json

    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts/check_layout.py")],
        capture_output=True,
        text=True,
        check=True,
    )
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("root_modules", "import_cycles", "training_imports_dump", "duplicate_rules"):
        assert isinstance(summary[key], int), key


def test_training_side_import_loads_no_teacher_side() -> None:
    """What a student's machine loads: neither the dump package nor transformers (the teacher's
    loader; a student is loaded through it only when ``run_train`` asks for one)."""
    code = (
        "import sys, logitcache.data, logitcache.loss, logitcache.train; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'accelerate') "
        "or m == 'logitcache.dump' or m.startswith('logitcache.dump.')); "
        "print(bad); sys.exit(bool(bad))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# -- the checker itself, on a fake package ---------------------------------------------------------


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


@pytest.fixture
def fake(tmp_path: Path) -> Path:
    _write(
        tmp_path,
        {
            "logitcache/__init__.py": "",
            "logitcache/a.py": "",
            "logitcache/data/__init__.py": "from logitcache.data.one import f\n",
            "logitcache/data/one.py": """
                from typing import TYPE_CHECKING
                if TYPE_CHECKING:
                    from logitcache.train import run  # never runs: not an edge
                def f():
                    from logitcache.dump import two  # a deferred import still loads dump
            """,
            "logitcache/dump/__init__.py": "",
            "logitcache/dump/two.py": "from logitcache.data import one\n",
            "logitcache/train/__init__.py": "",
            "logitcache/train/run.py": "from . import loop\n",
            "logitcache/train/loop.py": "import logitcache.train.run\n",
            "logitcache/format/__init__.py": "",
            "logitcache/format/m.py": "from ..store.s import x\n",
            "logitcache/store/__init__.py": "",
            "logitcache/store/s.py": """
                import torch
                def pick():
                    return torch.device("cuda") if torch.cuda.is_available() else None
                def check(a, b):
                    return [k for k in a if a.get(k) != b.get(k)]
            """,
            "logitcache/loss/__init__.py": "",
            "logitcache/loss/l.py": """
                import torch
                def auto():
                    if torch.cuda.is_available():
                        return torch.device("cuda", 0)
                def first_difference(a, b):
                    return None
            """,
        },
    )
    return tmp_path


def test_checker_finds_cycles_and_tells_deferred_ones_apart(fake: Path) -> None:
    layout = check_layout.measure(fake)
    assert layout.cycles == [
        ["logitcache.data.one", "logitcache.dump.two"],
        ["logitcache.train.loop", "logitcache.train.run"],
    ]
    assert layout.cycles_top_level == [["logitcache.train.loop", "logitcache.train.run"]]
    summary = layout.summary()
    assert summary["import_cycles_via_function_imports"] == 1
    assert summary["root_modules"] == 2


def test_checker_finds_forbidden_imports_transitively(fake: Path) -> None:
    rules = check_layout.measure(fake).rules
    assert rules["training_imports_dump"] == {
        "logitcache.data": ["logitcache.data", "logitcache.data.one", "logitcache.dump"],
        "logitcache.data.one": ["logitcache.data.one", "logitcache.dump"],
    }
    assert list(rules["format_imports_store"]) == ["logitcache.format.m"]
    assert rules["loss_imports_store_or_format"] == {}


def test_checker_counts_duplicated_rules(fake: Path) -> None:
    sites = check_layout.measure(fake).rule_sites
    assert sites["device_resolution"] == {
        "logitcache.loss.l": ["auto"],
        "logitcache.store.s": ["pick"],
    }
    assert sites["field_diff"] == {
        "logitcache.loss.l": ["first_difference"],
        "logitcache.store.s": ["check"],
    }
    summary = check_layout.measure(fake).summary()
    assert summary["duplicate_device_resolution"] == 1
    assert summary["duplicate_rules"] == 2
