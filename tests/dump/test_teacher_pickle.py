"""A teacher whose weights file is a code-running pickle is refused in one line, never run."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import pytest

from logitcache.dump.teacher import load_teacher
from logitcache.errors import TeacherError


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def test_pickled_teacher_weights_are_refused(tiny_teacher_dir: Path, tmp_path: Path) -> None:
    d = tmp_path / "teacher"
    shutil.copytree(tiny_teacher_dir, d)
    for f in d.glob("*.safetensors"):
        f.unlink()
    marker = tmp_path / "ran"
    with (d / "pytorch_model.bin").open("wb") as f:
        pickle.dump({"w": _Evil(marker)}, f)
    with pytest.raises(TeacherError, match=r"pytorch_model\.bin\) hold a pickle") as e:
        load_teacher(str(d), device="cpu")
    assert "\n" not in str(e.value)
    assert not marker.exists()
