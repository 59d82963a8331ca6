"""Everything ``logitcache.__all__`` promises can be imported from the top level."""

from __future__ import annotations

import subprocess
import sys

import logitcache


def test_every_public_name_resolves() -> None:
    for name in logitcache.__all__:
        assert getattr(logitcache, name) is not None, name


def test_import_is_light() -> None:
    code = "import sys, logitcache; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
