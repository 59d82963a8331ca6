"""``merge`` of caches dumped with another tensor-parallel degree or a device map (#15).

How a dump ran (``extra.dump.run``: T, data-parallel groups, device map; the number of writers)
is information, not the cache's identity: parts dumped by one process, by a T=2 torchrun group
(gloo, CPU) and with ``--device-map auto`` merge, and the merged manifest keeps each source's run
under ``extra.merged_from[i].dump``. What the targets are still has to agree: another k, another
teacher (same name, other weights) or another teacher dtype (``extra.dump.dtype``) is refused,
naming the field.

The parts are real dumps of the tiny teacher over the same documents; the dump numbers rows from
0, so every part but the first is rewritten through :class:`CacheWriter` with its row ids offset
(its header, targets and ``extra`` exactly as the dump recorded them), as a team would dump
disjoint data.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import TINY_CORPUS, build_tiny_llama

from logitcache.cli import cli
from logitcache.errors import ConfigError
from logitcache.store import CacheHeader, CacheReader, CacheWriter, merge_caches

OPTS = ("--seq-len", "32", "--k", "8", "--batch-size", "4", "--device", "cpu")
TESTS = Path(__file__).resolve().parents[1]


def _dump(teacher: Path, data: Path, out: Path, *extra: str) -> Path:
    args = ["dump", "--teacher", str(teacher), "--data", str(data), "--out", str(out), *OPTS]
    result = CliRunner().invoke(cli, [*args, *extra], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out


def _torchrun_dump(teacher: Path, data: Path, out: Path, t: int) -> Path:
    args = ["dump", "--teacher", str(teacher), "--data", str(data), "--out", str(out), *OPTS]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           str(t), "-m", "logitcache", *args, "--tensor-parallel", str(t)]  # fmt: skip
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def _offset(src: Path, dst: Path, offset: int) -> str:
    """``src`` rewritten with row ids + ``offset``: same header, targets and ``extra``."""
    reader = CacheReader(str(src))
    m = reader.manifest
    header = CacheHeader(
        codec=m.codec, targets=m.targets, seq_len=m.seq_len, vocab_size=m.vocab_size,
        padded_vocab_size=m.padded_vocab_size, backend=m.backend,
        compression_level=int(m.compression["level"]), teacher=m.teacher, tokenizer=m.tokenizer,
        dataset=m.dataset, extra=m.extra,
    )  # fmt: skip
    with CacheWriter(str(dst), header) as w:
        for rows in reader.iter_rows():
            w.write(rows.row_id + offset, rows.input_ids, rows.loss_mask, rows.targets)
    return str(dst)


def _rows(url: str) -> dict[int, tuple[bytes, bytes]]:
    out = {}
    for rows in CacheReader(url).iter_rows():
        t, off = rows.targets, rows.position_offsets
        for i, rid in enumerate(rows.row_id.tolist()):
            lo, hi = off[i], off[i + 1]
            out[rid] = (
                rows.input_ids[i].tobytes(),
                t.ids[lo:hi].tobytes() + t.logprobs[lo:hi].tobytes(),
            )
    return out


def _run(url: str) -> dict[str, Any]:
    return dict(json.loads(Path(url, "manifest.json").read_text())["extra"]["dump"]["run"])


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("merge_tp") / "docs.jsonl"
    docs = [" ".join(TINY_CORPUS[j % 6] for j in range(i % 3 + 1)) for i in range(8)]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


@pytest.fixture(scope="module")
def one(tmp_path_factory: pytest.TempPathFactory, tiny_teacher_dir: Path, data: Path) -> str:
    """The documents dumped by one process (rows 0..)."""
    return str(_dump(tiny_teacher_dir, data, tmp_path_factory.mktemp("merge_tp_one") / "one"))


@pytest.fixture(scope="module")
def parts(
    tmp_path_factory: pytest.TempPathFactory, tiny_teacher_dir: Path, data: Path, one: str
) -> dict[str, str]:
    """The same documents dumped by one process, by a T=2 torchrun group and with a device
    map; rows 0.., 1000.., 2000.."""
    root = tmp_path_factory.mktemp("merge_tp_parts")
    tp = _torchrun_dump(tiny_teacher_dir, data, root / "tp-dump", 2)
    mapped = _dump(tiny_teacher_dir, data, root / "mapped-dump", "--device-map", "auto")
    return {
        "one": one,
        "tp": _offset(tp, root / "tp", 1000),
        "mapped": _offset(mapped, root / "mapped", 2000),
    }


@pytest.mark.dist
def test_parts_dumped_with_other_tensor_parallel_and_device_map_merge(
    parts: dict[str, str], tmp_path: Path
) -> None:
    sources = [parts["one"], parts["tp"], parts["mapped"]]
    runs = [_run(u) for u in sources]
    assert [(r["tensor_parallel"], r["device_map"]) for r in runs] == [
        (1, None), (2, None), (1, "auto")
    ]  # fmt: skip
    out = str(tmp_path / "merged")
    m = merge_caches(out, sources)
    want: dict[int, tuple[bytes, bytes]] = {}
    for u in sources:
        want |= _rows(u)
    assert _rows(out) == want and m.num_rows == len(want)
    readers = [CacheReader(u).manifest for u in sources]
    assert m.coverage.positions == sum(r.coverage.positions for r in readers)
    # the agreed identity is kept; how each part ran is listed per source, never claimed for all
    one = dict(readers[0].extra["dump"])
    assert m.extra["dump"] == {k: v for k, v in one.items() if k not in ("run", "world_size",
                               "rank_split", "input", "special_tokens")}  # fmt: skip
    assert [s["dump"]["run"] for s in m.extra["merged_from"]] == runs
    result = CliRunner().invoke(cli, ["verify", out])
    assert result.exit_code == 0 and f"{len(want)} rows" in result.output, result.output


@pytest.mark.parametrize(
    ("change", "field"),
    [("k", "targets.k"), ("teacher", "teacher.fingerprint"), ("dtype", "extra.dump.dtype")],
)
def test_merge_refuses_parts_whose_targets_differ(
    one: str,
    tiny_teacher_dir: Path,
    tiny_tokenizer: Any,
    data: Path,
    tmp_path: Path,
    change: str,
    field: str,
) -> None:
    teacher, extra = tiny_teacher_dir, ()
    if change == "k":
        extra = ("--k", "4")
    elif change == "dtype":
        extra = ("--dtype", "bf16")
    else:  # same name, other weights
        teacher = tmp_path / "other" / tiny_teacher_dir.name
        build_tiny_llama(seed=1).save_pretrained(teacher)
        tiny_tokenizer.save_pretrained(teacher)
    other = _offset(_dump(teacher, data, tmp_path / "dump", *extra), tmp_path / "part", 3000)
    with pytest.raises(ConfigError, match=rf"differ in {field} "):
        merge_caches(str(tmp_path / "merged"), [one, other])
    assert not (tmp_path / "merged" / "manifest.json").exists()
