"""torchrun entry for the tensor-parallel kill tests: the ``logitcache`` CLI, slowed and traceable.

Each process writes its pid to ``$LOGITCACHE_TEST_PID_DIR/rank<RANK>.pid`` (so a test can SIGKILL
one chosen rank of the group, not torchrun) and sleeps ``$LOGITCACHE_TEST_DELAY`` seconds before
every batch's sparsify (so the test can wait for a committed shard, then kill, well before the
end). Test-only: nothing in the package reads these variables; the dump runs unchanged.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any


def _install() -> None:
    import logitcache.dump.run as run

    pid_dir = os.environ.get("LOGITCACHE_TEST_PID_DIR")
    if pid_dir:
        path = Path(pid_dir) / f"rank{os.environ.get('RANK', '0')}.pid"
        path.with_suffix(".tmp").write_text(str(os.getpid()))
        path.with_suffix(".tmp").replace(path)  # a reader never sees a half-written pid
    delay = float(os.environ.get("LOGITCACHE_TEST_DELAY", "0"))
    if delay <= 0:
        return
    for name in ("sparsify_batch", "sparsify_batch_tp"):
        inner = getattr(run, name)

        def slowed(*args: Any, _inner: Any = inner, **kwargs: Any) -> Any:
            time.sleep(delay)
            return _inner(*args, **kwargs)

        setattr(run, name, slowed)


if __name__ == "__main__":
    _install()
    from logitcache.cli import cli

    cli()
