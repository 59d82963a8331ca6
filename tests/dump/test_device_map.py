"""``logitcache dump --device-map auto``: Accelerate's big-model inference, offloading to disk
what ``--max-memory`` does not allow in memory, gives the same cache as a plain dump."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from test_dump import REF_OPTS, dump_args, load_cache, manifest, run_cli, text_data

__all__ = ["text_data"]  # the fixture, shared with test_dump


def test_device_map_with_disk_offload_equals_a_plain_dump(
    tmp_path: Path, tiny_teacher_dir: Path, text_data: Path
) -> None:
    plain, mapped = tmp_path / "plain", tmp_path / "mapped"
    run_cli(*dump_args(tiny_teacher_dir, text_data, plain, *REF_OPTS))
    # 60 kB of CPU memory for a 156 kB teacher: the rest, the head included, is on disk
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        run_cli(*dump_args(tiny_teacher_dir, text_data, mapped, *REF_OPTS, "--device-map",
                           "auto", "--max-memory", "cpu=60000"))  # fmt: skip
    assert not [w for w in seen if "cannot split the output head" in str(w.message)]
    run = manifest(mapped)["extra"]["dump"]["run"]
    full = manifest(plain)["extra"]["dump"]["run"]["teacher_parameter_bytes_per_rank"]
    assert run["device_map"] == "auto" and run["teacher_parameter_bytes_per_rank"] < full
    a, b = load_cache(plain), load_cache(mapped)
    assert sorted(a) == sorted(b)
    for rid in a:
        np.testing.assert_array_equal(a[rid].targets.ids, b[rid].targets.ids)
        np.testing.assert_allclose(a[rid].targets.logprobs, b[rid].targets.logprobs, atol=1e-6)


def test_device_map_refusals(tmp_path: Path, tiny_teacher_dir: Path, text_data: Path) -> None:
    args = dump_args(tiny_teacher_dir, text_data, tmp_path / "c")
    for extra, message in (
        (("--max-memory", "cpu=1GiB"), "add --device-map auto"),
        (("--device-map", "auto", "--max-memory", "gpu0:1GiB"), "DEVICE=AMOUNT"),
        (("--device-map", "auto", "--tensor-parallel", "2"), "exclude each other"),
    ):
        result = run_cli(*args, *extra, ok=False)
        assert result.exit_code != 0 and message in result.output, result.output
    result = run_cli(*dump_args("dump_factories:slow", text_data, tmp_path / "d", "--device-map",
                                "auto"), ok=False)  # fmt: skip
    assert result.exit_code != 0 and "Hugging Face model directory" in result.output
