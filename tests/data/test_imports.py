"""The training side never imports the teacher side (DESIGN.md: imports point down only)."""

from __future__ import annotations

import subprocess
import sys


def test_data_package_does_not_import_the_teacher_side() -> None:
    code = (
        "import sys, logitcache.data; "
        "bad = [m for m in ('logitcache.dump', 'transformers') "
        "if m in sys.modules]; print(bad); sys.exit(bool(bad))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
