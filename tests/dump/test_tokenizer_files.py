"""A cache carries its teacher's tokenizer (format 1.3): stored, listed, checked, copied, loaded;
older caches (no files) still read, and whatever needs the tokenizer asks for it."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import TINY_CORPUS

from logitcache.cli import cli
from logitcache.errors import CacheCorruptError, ChecksumMismatchError, ConfigError
from logitcache.format.fingerprint import tokenizer_fingerprint
from logitcache.format.manifest import FORMAT_VERSION, Manifest, content_digest
from logitcache.report import verify_cache
from logitcache.store import CacheHeader, CacheReader, CacheWriter, copy_cache, merge_caches
from logitcache.store.tokenizer import cache_tokenizer


def _run(*args: str) -> Any:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def _dump(teacher: Path, data: Path, out: Path, *extra: str) -> Path:
    _run("dump", "--teacher", str(teacher), "--data", str(data), "--out", str(out),
         "--seq-len", "32", "--k", "8", *extra)  # fmt: skip
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in TINY_CORPUS * 2))
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory, tiny_teacher_dir: Path, data: Path) -> Path:
    return _dump(tiny_teacher_dir, data, tmp_path_factory.mktemp("c") / "cache")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _old_format(url: Path) -> None:
    """Rewrite ``url``'s manifest the way a 1.2 writer wrote it: no tokenizer files."""
    d = json.loads((url / "manifest.json").read_text())
    d["tokenizer"].pop("files")
    d["format_version"] = "1.2"
    d["content_digest"] = content_digest(d)
    (url / "manifest.json").write_text(json.dumps(d))
    shutil.rmtree(url / "tokenizer")


def test_dump_stores_and_lists_the_tokenizer(cache: Path, tiny_tokenizer: Any) -> None:
    d = json.loads((cache / "manifest.json").read_text())
    assert d["format_version"] == FORMAT_VERSION == "1.3"
    files = d["tokenizer"]["files"]
    names = {f["path"] for f in files}
    assert "tokenizer/tokenizer.json" in names and "tokenizer/tokenizer_config.json" in names
    for f in files:
        data = (cache / f["path"]).read_bytes()
        assert len(data) == f["bytes"] and hashlib.sha256(data).hexdigest() == f["sha256"]
    # the files are inside a field the content digest covers (so a 1.2 reader, which ignores
    # them, computes the same digest as the stored one)
    assert Manifest.from_dict(d).content_digest == d["content_digest"]
    d["tokenizer"]["files"][0]["sha256"] = "0" * 64
    assert content_digest(d) != d["content_digest"]
    tok = cache_tokenizer(str(cache))
    assert tokenizer_fingerprint(tok) == d["tokenizer"]["fingerprint"]
    text = TINY_CORPUS[0]
    assert tok.decode(tiny_tokenizer(text)["input_ids"]) == text
    verify_cache(str(cache))
    out = _run("info", str(cache)).output
    assert "tokenizer/tokenizer.json" in out


def test_tampered_or_missing_tokenizer_file_is_caught(cache: Path, tmp_path: Path) -> None:
    bad = _copy(cache, tmp_path / "bad")
    path = bad / "tokenizer" / "tokenizer_config.json"
    raw = bytearray(path.read_bytes())
    raw[10] ^= 0x20  # same size, other bytes
    path.write_bytes(bytes(raw))
    with pytest.raises(CacheCorruptError, match=r"tokenizer_config\.json"):
        verify_cache(str(bad))
    with pytest.raises(ChecksumMismatchError, match=r"tokenizer_config\.json"):
        cache_tokenizer(str(bad))
    path.unlink()
    with pytest.raises(CacheCorruptError, match="missing"):
        cache_tokenizer(str(bad))
    result = CliRunner().invoke(cli, ["verify", str(bad)])
    assert result.exit_code == 1 and "tokenizer_config.json" in result.output


def test_old_format_cache_still_reads_and_asks_for_the_tokenizer(
    cache: Path, tmp_path: Path
) -> None:
    old = _copy(cache, tmp_path / "old")
    _old_format(old)
    reader = CacheReader(str(old))
    assert reader.manifest.format_version == "1.2" and not reader.manifest.tokenizer.files
    assert reader.read_rows(0, 1).num_rows == 1
    verify_cache(str(old))
    with pytest.raises(ConfigError, match=r"before format 1.3.*--teacher-tokenizer"):
        cache_tokenizer(str(old))


def test_copy_and_merge_carry_the_files(cache: Path, tmp_path: Path) -> None:
    copy_cache(str(cache), "memory://tok-copy")
    verify_cache("memory://tok-copy")
    assert cache_tokenizer("memory://tok-copy") is not None
    # merge: the second source holds the same teacher's rows under other ids and no tokenizer
    # files (as a 1.2 writer left it); the merged cache takes the files of the first source that
    # stores them, and compares tokenizers by fingerprint
    src = CacheReader(str(cache))
    m = src.manifest
    header = CacheHeader(
        codec=m.codec, targets=m.targets, seq_len=m.seq_len, vocab_size=m.vocab_size,
        padded_vocab_size=m.padded_vocab_size, compression_level=int(m.compression["level"]),
        teacher=m.teacher, tokenizer=m.tokenizer, dataset=m.dataset,
    )  # fmt: skip
    with CacheWriter(str(tmp_path / "second"), header) as w:  # given no files: lists none
        for rows in src.iter_rows():
            w.write(rows.row_id + 1000, rows.input_ids, rows.loss_mask, rows.targets)
    assert not CacheReader(str(tmp_path / "second")).manifest.tokenizer.files
    merged = merge_caches(str(tmp_path / "merged"), [str(tmp_path / "second"), str(cache)])
    assert merged.tokenizer.files == CacheReader(str(cache)).manifest.tokenizer.files
    verify_cache(str(tmp_path / "merged"))


def test_overwrite_and_resume_keep_the_tokenizer(
    cache: Path, tmp_path: Path, tiny_teacher_dir: Path, data: Path
) -> None:
    out = _copy(cache, tmp_path / "again")
    _dump(tiny_teacher_dir, data, out, "--overwrite")  # tokenizer/ belongs to a cache
    verify_cache(str(out))
    assert CacheReader(str(out)).manifest.tokenizer.files


def test_import_with_tokenizer_stores_it(
    cache: Path, tmp_path: Path, tiny_teacher_dir: Path
) -> None:
    from logitcache.transform.exporter import export_cache
    from logitcache.transform.importer import ImportConfig, import_cache

    export_cache(str(cache), str(tmp_path / "parquet"), layout="plain")
    out = str(tmp_path / "imported")
    import_cache(ImportConfig(str(tmp_path / "parquet"), out, tokenizer=str(tiny_teacher_dir)))
    m = CacheReader(out).manifest
    assert [f.sha256 for f in m.tokenizer.files] == [
        f.sha256 for f in CacheReader(str(cache)).manifest.tokenizer.files
    ]
    verify_cache(out)
    assert tokenizer_fingerprint(cache_tokenizer(out)) == m.tokenizer.fingerprint


def test_mix_carries_the_tokenizer(cache: Path) -> None:
    from logitcache.transform.mix import mix_caches

    out = "memory://tok-mixed"  # not a local disk: temporary names, then a move
    mix_caches(out, [str(cache), str(cache)])
    assert (
        CacheReader(out).manifest.tokenizer.files
        == CacheReader(str(cache)).manifest.tokenizer.files
    )
    verify_cache(out)
