"""``logitcache report CACHE`` on caches of real teacher distributions: the page parses, every
image decodes, and its numbers equal those computed here directly from the cache."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from page import decode_png, read_page
from real_cache import write_cache

from logitcache.cli import cli
from logitcache.errors import ConfigError
from logitcache.format.targets import SampledTargets, TopKTargets
from logitcache.report import report, report_cache
from logitcache.report.cache_stats import sample_positions
from logitcache.report.plots import MISSING_MATPLOTLIB
from logitcache.store import CacheReader

SEQ = 128


@pytest.fixture(scope="module")
def topk_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    url = tmp_path_factory.mktemp("report") / "topk"
    write_cache(url, 48 * SEQ, k=64, seq_len=SEQ, shard_bytes=60_000, batch_rows=8)
    return url


def _positions(url: Path, plan: dict[int, np.ndarray] | None = None) -> list[object]:
    """The decoded targets of the chosen positions (all of them without ``plan``), shard by
    shard, read with the plain reader."""
    r = CacheReader(str(url))
    out = []
    for shard in range(r.num_shards):
        lo, hi = int(r.shard_row_offsets[shard]), int(r.shard_row_offsets[shard + 1])
        t = r.read_rows(lo, hi).targets
        if plan is not None and shard not in plan:
            continue
        idx = plan[shard] if plan is not None else np.arange(t.num_positions)
        out.append((t, idx))
    return out


def _mass_at(url: Path, k: int, plan: dict[int, np.ndarray] | None = None) -> float:
    total, n = 0.0, 0
    for t, idx in _positions(url, plan):
        assert isinstance(t, TopKTargets)
        p = np.sort(np.exp(t.logprobs[idx].astype(np.float64)), axis=1)[:, ::-1]
        total += float(p[:, :k].sum())
        n += len(idx)
    return total / n


def _check_page(out: Path) -> object:
    page = read_page(out)
    assert page.scripts == 0 and page.external == []
    assert page.images, "no inline image"
    for data in page.images.values():
        decode_png(data)
    pngs = sorted(out.parent.glob(f"{out.stem}-*.png"))
    assert len(pngs) == len(page.images)
    for png in pngs:
        decode_png(png.read_bytes())
        assert png.read_bytes() in page.images.values()  # the same figures, inline and on disk
    return page


def test_cache_report_numbers_equal_direct_computation(topk_cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "r" / "report.html"
    res = report_cache(str(topk_cache), out)
    assert res.html == out and not res.sampled and res.kind == "cache"
    page = _check_page(out)
    assert set(page.images) == {"fig-mass", "fig-fidelity", "fig-distributions", "fig-bytes"}
    for k in (8, 64):
        got = float(page.cells[(str(k), "mass-mean")])
        assert got == pytest.approx(_mass_at(topk_cache, k), rel=1e-12, abs=1e-12), k
    m = CacheReader(str(topk_cache)).manifest
    tokens = m.num_rows * m.seq_len
    assert float(page.cells[(None, "bytes-per-token")]) == m.num_bytes / tokens
    assert float(page.cells[("64", "bytes-per-token")]) == pytest.approx(m.num_bytes / tokens)
    assert float(page.cells[("64", "kl-stored")]) == pytest.approx(0.0, abs=1e-9)
    # KL to the full vocabulary from the dump's entropy: positive, shrinking with k
    kl_full = [float(page.cells[(str(k), "kl-full")]) for k in (1, 8, 64)]
    assert kl_full[0] > kl_full[1] > kl_full[2] > 0
    text = page.all_text
    assert "NOT the teacher's full vocabulary" in text
    assert "Every one of the cache's 6,144 target positions was read" in text
    assert m.content_digest in text and "SmolLM2-135M-Instruct" in text
    assert "perplexity" in text
    assert "keep k = 64" in text or "fewer bytes" in text
    # where the bytes go: the Zarr arrays add up to the cache's bytes, exactly
    per_array = [v for (row, cls), v in page.cells.items() if cls == "array-bytes-per-token"]
    assert sum(float(v) for v in per_array) == pytest.approx(m.num_bytes / tokens)


def test_sampled_positions_are_documented_and_recomputable(
    topk_cache: Path, tmp_path: Path
) -> None:
    m = CacheReader(str(topk_cache)).manifest
    assert len(m.shards) >= 4
    plan = sample_positions(m, 1500, seed=3)
    assert sum(len(v) for v in plan.values()) == 1500
    assert len(plan) < len(m.shards)  # only the shards needed are read
    assert all(np.all(np.diff(v) > 0) for v in plan.values())
    again = sample_positions(m, 1500, seed=3)
    assert plan.keys() == again.keys() and all(np.array_equal(plan[k], again[k]) for k in plan)
    out = tmp_path / "s.html"
    res = report_cache(str(topk_cache), out, max_positions=1500, seed=3)
    assert res.sampled
    page = _check_page(out)
    assert "SAMPLED: the figures come from 1,500 of the cache's 6,144" in page.all_text
    for k in (8, 64):
        got = float(page.cells[(str(k), "mass-mean")])
        assert got == pytest.approx(_mass_at(topk_cache, k, plan), rel=1e-12), k


def test_arrow_cache_bytes_are_estimated_per_array(tmp_path: Path) -> None:
    url = tmp_path / "arrow"
    write_cache(url, 16 * SEQ, k=64, seq_len=SEQ, backend="arrow", batch_rows=8)
    out = tmp_path / "a.html"
    report_cache(str(url), out)
    page = _check_page(out)
    assert "ESTIMATED" in page.all_text
    m = CacheReader(str(url)).manifest
    per_array = [float(v) for (_, cls), v in page.cells.items() if cls == "array-bytes-per-token"]
    assert sum(per_array) == pytest.approx(m.num_bytes / (m.num_rows * m.seq_len), rel=1e-3)
    assert float(page.cells[("8", "mass-mean")]) == pytest.approx(_mass_at(url, 8), rel=1e-12)


def test_sampled_targets_cache(tmp_path: Path) -> None:
    url = tmp_path / "sampled"
    write_cache(url, 8 * SEQ, samples=32, seq_len=SEQ, batch_rows=4)
    out = tmp_path / "s.html"
    report([str(url)], out)
    page = _check_page(out)
    assert "fig-fidelity" not in page.images  # no truncation to draw for samples
    unique, mass = [], []
    for t, idx in _positions(url):
        assert isinstance(t, SampledTargets) and t.logprobs is not None
        unique.append(t.num_unique[idx])
        off = t.offsets()
        mass.append(np.add.reduceat(np.exp(t.logprobs.astype(np.float64)), off[:-1]))
    assert "recommendation" in page.ids
    text = page.all_text
    med = float(np.median(np.concatenate(unique)))
    assert f"a median {med:.0f} unique ids per position" in text
    assert f"carry a median {float(np.median(np.concatenate(mass))):.3f} of the mass" in text


def test_cli_report_and_refusals(topk_cache: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "cli" / "page.html"
    r = runner.invoke(cli, ["report", str(topk_cache), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert f"wrote {out}" in r.output and out.exists()
    (tmp_path / "empty").mkdir()
    r = runner.invoke(cli, ["report", str(tmp_path / "empty")])
    assert r.exit_code == 1 and "neither a cache" in r.output
    r = runner.invoke(cli, ["report", str(topk_cache), str(topk_cache)])
    assert r.exit_code == 1 and "not a training run directory" in r.output
    with pytest.raises(ConfigError, match="max_positions must be >= 1"):
        sample_positions(CacheReader(str(topk_cache)).manifest, 0)


def test_missing_matplotlib_names_the_extra(topk_cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "none.html"
    code = (
        "import sys; sys.modules['matplotlib'] = None; sys.modules['matplotlib.figure'] = None\n"
        "from logitcache.cli import main\n"
        f"sys.argv = ['logitcache', 'report', {str(topk_cache)!r}, '--out', {str(out)!r}]\n"
        "main()\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip() == f"error: {MISSING_MATPLOTLIB}"
    assert "pip install 'logitcache[report]'" in r.stderr
    assert not out.exists()
    # info and verify do not need it
    code = code.replace("'report'", "'info', '--json'").replace(f", '--out', {str(out)!r}", "")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert r.returncode == 0 and json.loads(r.stdout)["positions"] == 48 * SEQ
