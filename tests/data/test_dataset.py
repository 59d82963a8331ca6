"""The loader over real small caches: coverage per epoch, resume, decode equality, options."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from loader_cache import build_cache

from logitcache.data import (
    CachedLogitDataset,
    DevicePrefetcher,
    RowSampler,
    StreamingLogitDataset,
    TargetDequantizer,
    TargetOptions,
    make_loader,
    teacher_targets,
)
from logitcache.data._packing import materialize, pack, unpack
from logitcache.errors import CacheCorruptError, ConfigError
from logitcache.store import CacheReader


@pytest.fixture(scope="module")
def topk_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    return build_cache(tmp_path_factory.mktemp("loader") / "topk")


def real_row_ids(batch: dict[str, Any]) -> list[int]:
    return batch["row_id"][~batch["is_pad"]].tolist()


@pytest.mark.parametrize("workers", [0, 1, 2])
@pytest.mark.parametrize("world", [1, 2, 4])
def test_every_row_exactly_once_per_epoch(topk_url: str, world: int, workers: int) -> None:
    reader = CacheReader(topk_url)
    want = sorted(reader.read_rows(0, reader.num_rows).row_id.tolist())
    seen: list[int] = []
    steps = set()
    for rank in range(world):
        loader = make_loader(
            topk_url, 3, seed=5, num_workers=workers, rank=rank, world_size=world, device="cpu"
        )
        batches = list(loader)
        steps.add(len(batches))
        for b in batches:
            assert len(b["row_id"]) == 3  # static shapes, padding included
            assert not b["position_mask"][b["is_pad"]].any()
            assert (b["labels"][b["is_pad"]] == -100).all()
            seen += real_row_ids(b)
    assert len(steps) == 1  # every rank takes the same number of steps
    assert sorted(seen) == want


def test_random_order_map_style_covers_every_row(topk_url: str) -> None:
    loader = make_loader(topk_url, 4, order="random", num_workers=2)
    seen = [r for b in loader for r in real_row_ids(b)]
    assert sorted(seen) == list(range(1000, 1053))


def run_ids(loader: Any, steps: int | None = None) -> list[list[int]]:
    out = []
    for b in loader:
        out.append(b["row_id"].tolist())
        if steps is not None and len(out) == steps:
            break
    return out


@pytest.mark.parametrize(("order", "workers"), [("streaming", 0), ("streaming", 2), ("random", 2)])
def test_resume_with_the_same_settings_equals_an_uninterrupted_run(
    topk_url: str, order: str, workers: int
) -> None:
    full = make_loader(topk_url, 4, seed=3, order=order, num_workers=workers)
    reference = run_ids(full) + run_ids(full)  # two epochs
    first = make_loader(topk_url, 4, seed=3, order=order, num_workers=workers)
    got = run_ids(first, steps=5)
    state = first.state_dict()
    del first
    second = make_loader(topk_url, 4, seed=3, order=order, num_workers=workers)
    second.load_state_dict(state)
    got += run_ids(second)  # rest of epoch 0
    got += run_ids(second, steps=3)
    state = second.state_dict()
    third = make_loader(topk_url, 4, seed=3, order=order, num_workers=workers)
    third.load_state_dict(state)
    got += run_ids(third)
    assert got == reference
    assert third.epoch == 2


@pytest.mark.parametrize(("order", "before", "after"), [("streaming", 0, 2), ("random", 2, 1)])
def test_resume_with_other_workers_and_world_serves_the_rest_once(
    topk_url: str, order: str, before: int, after: int
) -> None:
    first = make_loader(topk_url, 4, seed=3, order=order, num_workers=before)
    seen = [r for b in run_ids(first, steps=5) for r in b]
    state = first.state_dict()
    for rank in range(3):  # resume on 3 ranks with another batch size and worker count
        rest = make_loader(
            topk_url, 2, seed=3, order=order, num_workers=after, rank=rank, world_size=3
        )
        rest.load_state_dict(state)
        seen += [r for b in rest for r in real_row_ids(b)]
    assert sorted(seen) == list(range(1000, 1053))


class CountingDataset(StreamingLogitDataset):
    """Counts the shards this process decodes."""

    def view(self, shard: int) -> Any:
        self.decoded.append(shard)
        return super().view(shard)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_each_shard_is_decoded_once_per_epoch_over_ranks_and_workers(
    topk_url: str, world: int
) -> None:
    reader = CacheReader(topk_url)
    sizes = [s.rows for s in reader.manifest.shards]
    decoded = []
    for rank in range(world):
        for w in range(2):
            sampler = RowSampler(
                sizes, 2, order="streaming", rank=rank, world_size=world, num_workers=2, seed=1
            )
            ds = CountingDataset(topk_url, sampler, readahead=1)
            ds.decoded = []
            batches = list(ds._stream(sampler.iter_batches(w, 2)))
            assert len(batches) == len(list(sampler.iter_batches(w, 2)))
            decoded += ds.decoded
    assert sorted(decoded) == list(range(len(sizes)))


def test_collated_targets_equal_the_codec_decode(topk_url: str) -> None:
    reader = CacheReader(topk_url)
    loader = make_loader(topk_url, 5, seed=1, num_workers=0, device="cpu")
    for b in loader:
        s = reader.manifest.seq_len
        flat = 0
        for i, rid in enumerate(b["row_id"].tolist()):
            mask = b["position_mask"][i].numpy()
            if b["is_pad"][i]:
                assert not mask.any()
                continue
            rows = reader.read_rows(reader.find(rid), reader.find(rid) + 1)
            assert np.array_equal(mask, rows.loss_mask[0])
            assert np.array_equal(b["input_ids"][i].numpy(), rows.input_ids[0])
            n = int(mask.sum())
            t = rows.targets
            sl = slice(flat, flat + n)
            assert np.array_equal(b["target_ids"][sl].numpy(), t.ids)
            np.testing.assert_allclose(b["logprobs"][sl].numpy(), t.logprobs, rtol=0, atol=2e-6)
            np.testing.assert_allclose(
                b["tail_logprob"][sl].numpy(), t.tail_logprob, rtol=0, atol=2e-6
            )
            idx = b["target_index"][sl].numpy()
            assert np.array_equal(idx, i * s + np.flatnonzero(mask))
            nxt = np.append(rows.input_ids[0, 1:], -100)
            lab = np.where(mask, nxt, -100)
            lab[-1] = -100
            assert np.array_equal(b["labels"][i].numpy(), lab)
            flat += n
        assert flat == len(b["target_ids"])
        teacher = teacher_targets(b)
        assert len(teacher) == flat


def test_prefetcher_and_torch_dequant_path_match_plain_decode(topk_url: str) -> None:
    reader = CacheReader(topk_url)
    sampler = RowSampler([s.rows for s in reader.manifest.shards], 4, order="streaming")
    ds = StreamingLogitDataset(topk_url, sampler)
    numpy_path = TargetDequantizer(reader.codec)
    torch_path = TargetDequantizer(reader.codec)
    torch_path.numpy_on_cpu = False  # the code path CUDA devices take
    plain = [numpy_path(b) for b in ds]
    via = list(DevicePrefetcher(iter(ds), "cpu", transform=torch_path, background=True))
    assert len(plain) == len(via)
    for a, b in zip(plain, via, strict=True):
        assert a.keys() == b.keys()
        for key, v in a.items():
            if not isinstance(v, torch.Tensor):
                assert v == b[key]
            elif v.is_floating_point():  # the normaliser's float32 sums differ in order only
                torch.testing.assert_close(v, b[key], rtol=0, atol=1e-6)
            else:
                assert torch.equal(v, b[key])


def reference_top(t: Any, k2: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Naive reference: per position, the k2 largest log-probs (ties: lower id), sorted by id,
    and the tail grown by the dropped mass."""
    ids, lps, tails = [], [], []
    for i in range(len(t.ids)):
        order = sorted(range(t.ids.shape[1]), key=lambda j: (-t.logprobs[i, j], t.ids[i, j]))
        keep = sorted(order[:k2], key=lambda j: t.ids[i, j])
        drop = order[k2:]
        ids.append(t.ids[i, keep])
        lps.append(t.logprobs[i, keep])
        tails.append(np.log(np.exp(t.tail_logprob[i]) + np.exp(t.logprobs[i, drop]).sum()))
    return np.array(ids), np.array(lps), np.array(tails)


@pytest.mark.parametrize("values", ["sqrt", "float32"])
def test_fewer_targets_than_stored_equals_the_reference(tmp_path: Path, values: str) -> None:
    url = build_cache(tmp_path / "c", rows=20, values=values)
    reader = CacheReader(url)
    loader = make_loader(url, 20, order="sequential", top_k=3)
    (b,) = list(loader)
    t = reader.read_rows(0, 20).targets
    ids, lps, tails = reference_top(t, 3)
    assert np.array_equal(b["target_ids"].numpy(), ids)
    np.testing.assert_allclose(b["logprobs"].numpy(), lps, rtol=0, atol=2e-6)
    np.testing.assert_allclose(b["tail_logprob"].numpy(), tails, rtol=0, atol=2e-5)


def test_options_drop_tail_temperature_and_position_selection(topk_url: str) -> None:
    loader = make_loader(
        topk_url, 6, order="sequential", keep_tail=False, temperature=2.0, positions=skip_first
    )
    reader = CacheReader(topk_url)
    b = next(iter(loader))
    assert "tail_logprob" not in b
    stored = reader.read_rows(0, 6)
    want = stored.loss_mask.copy()
    want[:, :3] = False
    assert np.array_equal(b["position_mask"].numpy(), want)
    keep = want[stored.loss_mask]
    np.testing.assert_array_equal(
        b["temperature_lognorm"].numpy(), stored.targets.temperature_lognorm[keep, 0]
    )
    assert "temperature_lognorm" not in next(iter(make_loader(topk_url, 6, temperature=3.0)))


def skip_first(input_ids: np.ndarray, loss_mask: np.ndarray) -> np.ndarray:
    out = loss_mask.copy()
    out[:, :3] = False
    return out


def test_sampled_cache_collates_padded_ids_and_counts(tmp_path: Path) -> None:
    url = build_cache(tmp_path / "s", kind="sampled")
    reader = CacheReader(url)
    b = next(iter(make_loader(url, 7, order="sequential")))
    t = reader.read_rows(0, 7).targets
    offsets = t.offsets()
    assert b["target_ids"].shape == (len(t.num_unique), int(t.num_unique.max()))
    for p in range(len(t.num_unique)):
        m = int(t.num_unique[p])
        e = slice(int(offsets[p]), int(offsets[p + 1]))
        assert np.array_equal(b["target_ids"][p, :m].numpy(), t.ids[e])
        assert np.array_equal(b["counts"][p, :m].numpy(), t.counts[e])
        np.testing.assert_array_equal(b["logprobs"][p, :m].numpy(), t.logprobs[e])
        assert (b["counts"][p, m:] == 0).all() and (b["target_ids"][p, m:] == 0).all()
    teacher = teacher_targets(b)
    assert teacher.num_draws == 16


def test_bad_arguments_are_config_errors(topk_url: str) -> None:
    reader = CacheReader(topk_url)
    sampler = RowSampler([s.rows for s in reader.manifest.shards], 4, order="random")
    with pytest.raises(ConfigError, match="streaming"):
        StreamingLogitDataset(topk_url, sampler)
    with pytest.raises(ConfigError, match="RowBatch"):
        CachedLogitDataset(topk_url)[3]  # type: ignore[index]
    with pytest.raises(ConfigError, match="top_k"):
        make_loader(topk_url, 4, top_k=0)


@pytest.mark.parametrize("keep_tail", [True, False])
def test_device_side_decode_equals_the_codec_decode(topk_url: str, keep_tail: bool) -> None:
    """The torch path devices take (ids from delta planes, the sqrt normaliser over k + 1 codes)
    gives the codec's ids exactly and its log-probs to float32 summation order."""
    reader = CacheReader(topk_url)
    sampler = RowSampler([s.rows for s in reader.manifest.shards], 7, order="sequential")
    ds = StreamingLogitDataset(topk_url, sampler, options=TargetOptions(keep_tail=keep_tail))
    device_path = TargetDequantizer(reader.codec)
    device_path.numpy_on_cpu = False
    start = 0
    for host in ds:
        assert any(f[0] == "id_lo" for f in host["layout"])  # compact to the device
        b = device_path(host)
        rows = int((~b["is_pad"]).sum())
        t = reader.read_rows(start, start + rows).targets
        start += rows
        assert b["target_ids"].dtype == torch.int32
        assert np.array_equal(b["target_ids"].numpy(), t.ids)
        np.testing.assert_allclose(b["logprobs"].numpy(), t.logprobs, rtol=0, atol=2e-6)
        if keep_tail:
            np.testing.assert_allclose(b["tail_logprob"].numpy(), t.tail_logprob, rtol=0, atol=2e-6)
        else:
            assert "tail_logprob" not in b
    assert start == reader.num_rows


def test_damaged_codes_are_caught_by_the_cpu_decode(topk_url: str) -> None:
    reader = CacheReader(topk_url)
    sampler = RowSampler([s.rows for s in reader.manifest.shards], 7, order="sequential")
    host = next(iter(StreamingLogitDataset(topk_url, sampler)))
    fields = unpack(host)
    fields["value_code"][0, 0] = reader.codec.quant_levels + 1
    with pytest.raises(CacheCorruptError, match="exceed levels"):
        TargetDequantizer(reader.codec)(host)
    host = next(iter(StreamingLogitDataset(topk_url, sampler)))
    unpack(host)["id_hi_delta"][0, -1] = 255
    with pytest.raises(CacheCorruptError, match="vocab_size"):
        TargetDequantizer(reader.codec)(host)


def test_worker_batches_arrive_in_one_shared_buffer(topk_url: str) -> None:
    loader = make_loader(topk_url, 5, num_workers=1, device="cpu")
    plain = make_loader(topk_url, 5, num_workers=0, device="cpu")
    for a, b in zip(loader, plain, strict=True):
        assert a.keys() == b.keys()
        for key, v in a.items():
            assert torch.equal(v, b[key]) if isinstance(v, torch.Tensor) else v == b[key]


class SharedProbe(torch.utils.data.Dataset[bool]):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> bool:
        return bool(materialize(pack({"x": np.arange(3 + i)})["packed"]).is_shared())


def test_buffers_are_born_shared_in_workers_only() -> None:
    assert list(torch.utils.data.DataLoader(SharedProbe(), batch_size=None)) == [False, False]
    in_worker = torch.utils.data.DataLoader(SharedProbe(), batch_size=None, num_workers=1)
    assert list(in_worker) == [True, True]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("background", [False, True])
def test_cuda_batches_from_workers_equal_the_cpu_decode(topk_url: str, background: bool) -> None:
    """Worker ring buffers -> pin thread -> side-stream copy -> device dequantisation."""
    gpu = make_loader(topk_url, 5, seed=2, num_workers=2, device="cuda", background=background)
    cpu = make_loader(topk_url, 5, seed=2, num_workers=0, device="cpu")
    for a, b in zip(gpu, cpu, strict=True):
        assert a.keys() == b.keys()
        for key, v in a.items():
            if isinstance(v, torch.Tensor):
                assert v.is_cuda
                torch.testing.assert_close(v.cpu(), b[key], rtol=1e-6, atol=1e-6)
            else:
                assert v == b[key]
