"""The sampling rules of sampled dumps (logitcache/dump/tree_sampling.py).

The tree rule draws from the teacher's distribution (chi-square on a padded small vocabulary),
barely moves when the logits move by their rounding (against inverse CDF, which slides across
tiny-probability ids), walks the same way sharded over gloo ranks as in one process (the real
tensor-parallel ``_chunk`` on identical logits), and a cache dumped by the old rule resumes with
it. The inverse-CDF uniforms are pinned: old caches must keep drawing what they drew.

Run as a script under torchrun, this file is the tensor-parallel worker of
``test_tree_walk_over_gloo_ranks_equals_one_rank``.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_dump import TESTS, _env, dump_args, load_cache, manifest, run_cli, text_data

from logitcache.dump.draws import uniforms
from logitcache.dump.sparsify import SparsifyConfig, sparsify_chunk

__all__ = ["text_data"]  # the fixture, shared with test_dump

HERE = Path(__file__).resolve()
TP_VOCAB, TP_ROWS, TP_SAMPLES = 301, 48, 64


def _draws(z: torch.Tensor, rule: str, samples: int, seed: int = 7) -> tuple[np.ndarray, ...]:
    """Sampled draws of each row of ``z`` (row i: row id i, position 3): per position the
    count of each id [N, V], and the chunk's log-probs of the drawn ids and their reference."""
    n, v = z.shape
    r = sparsify_chunk(z.clone(), method="sampled", k=1, samples=samples, seed=seed,
                       temperatures=(), row_ids=torch.arange(n), positions=torch.full((n,), 3),
                       sampling_rule=rule)  # fmt: skip
    owner = np.repeat(np.arange(n), r.num_unique.numpy())
    counts = np.zeros((n, v), dtype=np.int64)
    np.add.at(counts, (owner, r.ids.numpy()), r.counts.numpy())
    want = torch.log_softmax(z.double(), dim=1)[torch.as_tensor(owner), r.ids].numpy()
    return counts, r.logprobs.numpy(), want


def _chi2_limit(df: int, z: float = 4.75) -> float:
    """Wilson-Hilferty: the chi-square quantile at a standard-normal z (4.75: p ~ 1e-6)."""
    a = 2.0 / (9 * df)
    return df * (1 - a + z * math.sqrt(a)) ** 3


def test_inverse_cdf_uniforms_are_unchanged() -> None:
    """The old rule's stream (levels=0) is bit-identical to before the tree rule existed."""
    rows, pos = torch.tensor([0, 7, 2**40 + 3]), torch.tensor([0, 5, 511])
    u = uniforms(2**33 + 5, rows, pos, 6)
    codes = (u[:, :3].double() * 2**24 - 0.5).round().long().tolist()
    assert codes == [[6373009, 10211808, 12723854], [7007290, 8284730, 12786012],
                     [11513124, 16165062, 12020906]]  # fmt: skip
    levels = uniforms(2**33 + 5, rows, pos, 6, levels=3)
    assert levels.shape == (3, 3, 6)
    for stream in (*levels, u):  # distinct streams, all in (0, 1)
        assert ((stream > 0) & (stream < 1)).all()
    assert len({tuple(s.flatten().tolist()) for s in (*levels, u)}) == 4


def test_tree_draws_follow_the_distribution() -> None:
    """Vocab 13 (a tree of 16 leaves, 3 padded) with a 2e-3 id and a zero-mass one: 256,000
    draws pass a chi-square test against softmax(z); padded and zero-mass ids never appear."""
    z0 = torch.tensor([2.0, -1.0, 0.5, 3.0, -4.0, -200.0, 1.0, 0.0, -2.0, 2.5, -0.5, 1.5, -1.5])
    n, samples = 4000, 64
    counts, lp, want = _draws(z0.expand(n, -1), "tree", samples)
    p = torch.softmax(z0.double(), 0).numpy()
    freq = counts.sum(0)
    assert freq.sum() == n * samples and freq[5] == 0
    live = p > 1e-9
    expected = p[live] * n * samples
    chi2 = float(((freq[live] - expected) ** 2 / expected).sum())
    assert chi2 < _chi2_limit(int(live.sum()) - 1), (chi2, freq, expected)
    np.testing.assert_allclose(lp, want, atol=2e-6)  # the stored log-probs are the ids' own


@pytest.mark.parametrize("vocab", [1, 2, 3, 33, 257])
def test_tree_on_odd_and_tiny_vocabularies(vocab: int) -> None:
    """Depth 0 (one id) up to a group boundary plus one: every draw a real id, right law."""
    z0 = torch.linspace(-3.0, 1.0, vocab)
    counts, lp, want = _draws(z0.expand(400, -1), "tree", 64)
    assert counts.shape[1] == vocab and counts.sum() == 400 * 64
    p = torch.softmax(z0.double(), 0).numpy()
    np.testing.assert_allclose(counts.sum(0) / counts.sum(), p, atol=0.01)
    np.testing.assert_allclose(lp, want, atol=2e-6)


def test_tree_draws_barely_move_when_the_logits_move() -> None:
    """A heavy-tailed vocabulary of 49,152 ids (Zipf ranks in random id order, noise), logits
    perturbed by N(0, 1e-4) like a tensor-parallel forward: inverse CDF moves draws across
    the tiny-probability ids (8.6% here), the tree moves ~1e-4 of them."""
    g = torch.Generator().manual_seed(0)
    n, vocab, samples = 128, 49_152, 64
    rank = torch.stack([torch.randperm(vocab, generator=g) for _ in range(n)]).float()
    z = -1.1 * torch.log1p(rank) + 0.5 * torch.randn(n, vocab, generator=g)
    moved_z = z + 1e-4 * torch.randn(n, vocab, generator=g)
    moved = {}
    for rule in ("inverse-cdf", "tree"):
        a, b = _draws(z, rule, samples)[0], _draws(moved_z, rule, samples)[0]
        moved[rule] = 1 - np.minimum(a, b).sum() / (n * samples)
    assert moved["tree"] <= 1e-3 and moved["tree"] * 20 < moved["inverse-cdf"], moved


def test_the_rule_is_validated() -> None:
    from logitcache.dump import DumpConfig
    from logitcache.errors import ConfigError

    with pytest.raises(ConfigError, match="sampling_rule must be one of"):
        SparsifyConfig(method="sampled", sampling_rule="cdf")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="sampling_rule must be one of"):
        DumpConfig(teacher="t", data="d", out="o", seq_len=8, sampling_rule="x")  # type: ignore[arg-type]


@pytest.mark.dist
def test_an_inverse_cdf_cache_resumes_with_its_rule(
    tmp_path: Path, tiny_teacher_dir: Path, text_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cache of the old rule (no ``sampling_rule`` recorded, as before the tree existed),
    killed after its first shard, resumes without ``--sampling-rule`` into the uninterrupted
    inverse-CDF cache; ``--sampling-rule tree`` on it is refused naming the field; a new dump
    records ``tree`` and draws other ids."""
    monkeypatch.syspath_prepend(str(TESTS))
    monkeypatch.setenv("LOGITCACHE_TEST_TEACHER", str(tiny_teacher_dir))
    opts = ("--method", "sampled", "--samples", "16", "--batch-size", "5", "--shard-mb", "0.005",
            "--no-count")  # fmt: skip
    old_rule = ("--sampling-rule", "inverse-cdf")
    old, cut, new = tmp_path / "old", tmp_path / "cut", tmp_path / "new"
    run_cli(*dump_args("dump_factories:slow", text_data, old, *opts, *old_rule))
    assert "sampling_rule" not in manifest(old)["extra"]["dump"]
    cmd = [sys.executable, "-m", "logitcache",
           *dump_args("dump_factories:slow", text_data, cut, *opts, *old_rule)]  # fmt: skip
    proc = subprocess.run(cmd, env=_env(LOGITCACHE_TEST_EXIT_BEFORE_MANIFEST="all"),
                          capture_output=True, text=True, timeout=240)  # fmt: skip
    assert proc.returncode == 9, proc.stderr[-3000:]
    progress = cut / "_writers" / "main.json"
    record = json.loads(progress.read_text())
    assert len(record["shards"]) >= 2
    record["shards"] = record["shards"][:1]  # as if killed right after its first shard
    progress.write_text(json.dumps(record))
    resume = dump_args("dump_factories:slow", text_data, cut, *opts, "--resume")
    refused = run_cli(*resume, "--sampling-rule", "tree", ok=False)
    assert refused.exit_code == 1 and "extra.dump.sampling_rule" in refused.output
    result = run_cli(*resume)
    assert f"{record['shards'][0]['rows']:,} rows resumed" in result.output
    want, got = manifest(old), manifest(cut)
    for m in (want, got):
        m.pop("created_at")
    assert got == want
    run_cli(*dump_args("dump_factories:slow", text_data, new, *opts))
    assert manifest(new)["extra"]["dump"]["sampling_rule"] == "tree"
    a, b = load_cache(old), load_cache(new)
    assert any(not np.array_equal(a[r].targets.ids, b[r].targets.ids) for r in a)


# -- the tensor-parallel walk on identical logits, real gloo ranks -----------------------------


def _tp_logits() -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    rank = torch.stack([torch.randperm(TP_VOCAB, generator=g) for _ in range(TP_ROWS)]).float()
    return -1.2 * torch.log1p(rank) + 0.3 * torch.randn(TP_ROWS, TP_VOCAB, generator=g)


def _tp_worker(out: str) -> None:
    """One rank: its id range of the logits as a ShardedHead whose weight is the identity (so
    its logits are exactly the one-process ones), through tp_sparsify's chunk."""
    import torch.distributed as dist

    from logitcache.dump.head import ShardedHead
    from logitcache.dump.tp_sparsify import _chunk

    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    width = -(-TP_VOCAB // size)
    lo, hi = min(rank * width, TP_VOCAB), min((rank + 1) * width, TP_VOCAB)
    if size == 3:  # uneven, and one rank with no real ids at all
        lo, hi = ((0, 151), (151, TP_VOCAB), (TP_VOCAB, TP_VOCAB))[rank]
    eye = torch.eye(TP_VOCAB)[lo:hi]
    head = ShardedHead(torch.nn.Identity(), eye, None, None, None, offset=lo, width=width,
                       group=dist.group.WORLD, tp_rank=rank, tp_size=size)  # fmt: skip
    config = SparsifyConfig(method="sampled", samples=TP_SAMPLES, seed=7)
    n = TP_ROWS
    with torch.no_grad():
        r = _chunk(head, _tp_logits(), config, torch.arange(n), torch.full((n,), 3),
                   torch.full((n,), -1), TP_VOCAB)  # fmt: skip
    if rank == 0:
        owner = np.repeat(np.arange(n), r.num_unique.numpy()).tolist()
        got = {"owner": owner, "ids": r.ids.tolist(), "counts": r.counts.tolist(),
               "logprobs": r.logprobs.tolist()}  # fmt: skip
        Path(out).write_text(json.dumps(got))
    dist.destroy_process_group()


@pytest.mark.dist
@pytest.mark.parametrize("t", [2, 3])
def test_tree_walk_over_gloo_ranks_equals_one_rank(tmp_path: Path, t: int) -> None:
    """Vocab 301 (a tree of 512 leaves) split 151/150 over T=2, or 151/150/0 over T=3: the
    draws equal the one-process draws exactly, and their log-probs to float rounding."""
    out = tmp_path / "tp.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           str(t), str(HERE), str(out)]  # fmt: skip
    proc = subprocess.run(cmd, env=_env(OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(out.read_text())
    one = sparsify_chunk(_tp_logits(), method="sampled", k=1, samples=TP_SAMPLES, seed=7,
                         temperatures=(), row_ids=torch.arange(TP_ROWS),
                         positions=torch.full((TP_ROWS,), 3))  # fmt: skip
    owner = np.repeat(np.arange(TP_ROWS), one.num_unique.numpy())
    assert got["owner"] == owner.tolist()
    assert got["ids"] == one.ids.tolist() and got["counts"] == one.counts.tolist()
    np.testing.assert_allclose(got["logprobs"], one.logprobs.numpy(), atol=2e-6)


if __name__ == "__main__":
    _tp_worker(sys.argv[1])
