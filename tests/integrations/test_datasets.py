"""``to_iterable_dataset``: a cache streamed by ``datasets`` yields the loader's rows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

hf = pytest.importorskip("datasets")

import torch  # noqa: E402
from kd_cache import dump_tiny, teacher  # noqa: E402

from logitcache.data import make_loader  # noqa: E402
from logitcache.errors import CacheIncompleteError  # noqa: E402
from logitcache.integrations.datasets import to_iterable_dataset  # noqa: E402


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    url = tmp_path_factory.mktemp("ds") / "cache"
    dump_tiny(teacher(), url, rows=48, seed=2)
    return url


def loader_rows(url: Path, split: Any = None) -> dict[int, dict[str, Any]]:
    """Every row as the loader delivers it, keyed by row id."""
    out: dict[int, dict[str, Any]] = {}
    for b in make_loader(str(url), 5, order="sequential", device="cpu", split=split):
        mask = b["position_mask"]
        flat = torch.zeros(mask.numel(), dtype=torch.long)
        flat[b["target_index"]] = torch.arange(len(b["target_index"]))
        flat = flat.view(mask.shape)
        for r in range(mask.shape[0]):
            if b["is_pad"][r]:
                continue
            at = flat[r][mask[r]]
            out[int(b["row_id"][r])] = {
                "input_ids": b["input_ids"][r].tolist(),
                "loss_mask": mask[r].tolist(),
                "target_ids": b["target_ids"][at].tolist(),
                "logprobs": b["logprobs"][at].numpy(),
                "tail_logprob": b["tail_logprob"][at].numpy(),
            }
    return out


def test_streams_the_loaders_rows(cache: Path) -> None:
    ds = to_iterable_dataset(str(cache))
    assert isinstance(ds, hf.IterableDataset) and ds.num_shards > 1
    want = loader_rows(cache)
    got = list(ds)
    assert sorted(r["row_id"] for r in got) == sorted(want)
    for rec in got:
        ref = want[rec["row_id"]]
        assert rec["input_ids"] == ref["input_ids"] and rec["loss_mask"] == ref["loss_mask"]
        at = [p for p, m in enumerate(rec["loss_mask"]) if m]
        assert [rec["target_ids"][p] for p in at] == ref["target_ids"]
        assert all(rec["target_ids"][p] == [] for p, m in enumerate(rec["loss_mask"]) if not m)
        np.testing.assert_allclose([rec["logprobs"][p] for p in at], ref["logprobs"], atol=1e-6)
        np.testing.assert_allclose(
            [rec["tail_logprob"][p] for p in at], ref["tail_logprob"], atol=1e-6
        )


def test_split_and_torch_workers(cache: Path) -> None:
    split = ("eval", 0.3)
    ds = to_iterable_dataset(str(cache), split=split)
    loader = torch.utils.data.DataLoader(ds.with_format("torch"), batch_size=None, num_workers=2)
    ids = sorted(int(r["row_id"]) for r in loader)
    assert ids == sorted(loader_rows(cache, split))


def test_unknown_tail_has_no_tail_column(tmp_path: Path) -> None:
    dump_tiny(teacher(), tmp_path / "u", rows=16, seed=1, tail="unknown")
    rec = next(iter(to_iterable_dataset(str(tmp_path / "u"))))
    assert "tail_logprob" not in rec and "logprobs" in rec


def test_incomplete_cache_refused(tmp_path: Path) -> None:
    (tmp_path / "c" / "shards").mkdir(parents=True)
    with pytest.raises(CacheIncompleteError):
        to_iterable_dataset(str(tmp_path / "c"))
