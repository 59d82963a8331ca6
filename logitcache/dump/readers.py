"""Record readers behind :mod:`logitcache.dump.inputs`: find files, pick the column, stream values.

One reader per container, each a generator that holds one record (or one batch of a parquet/arrow
file, or one chunk of a flat token file) at a time. What a value *is* (text, chat messages, token
ids) is read off the first non-null value of the column, so ``input_format`` only ever names the
container. ``.txt`` files hold one document per paragraph (documents are separated by blank lines;
single newlines stay inside the document), which keeps prose intact while streaming line by line.
"""

from __future__ import annotations

import enum
import json
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np

from logitcache.errors import InputError, InputNotFoundError

CONTAINERS = {
    ".txt": "txt",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".arrow": "arrow",
    ".feather": "arrow",
    ".ipc": "arrow",
    ".npy": "npy",
    ".bin": "bin",
}
CONTAINERS.update({v: v for v in list(CONTAINERS.values())})
_DEFAULT_COLUMNS = ("text", "messages", "input_ids")
_FLAT_CHUNK = 1 << 20
_TABLE_BATCH = 256


class DocKind(enum.Enum):
    TEXT = "text"
    CHAT = "chat"
    TOKENS = "tokens"  # an input_ids column: one document per record
    FLAT = "flat-tokens"  # a .npy/.bin stream: one long sequence


@dataclass(frozen=True)
class InputSource:
    """Resolved input: the files, their container, the column and the kind of its values."""

    fs: Any
    paths: list[str]
    container: str
    column: str | None
    kind: DocKind
    description: str
    token_dtype: str | None

    def records(self) -> Iterator[Any]:
        for path in self.paths:
            if self.container == "txt":
                yield from _txt(self.fs, path)
            elif self.container in ("npy", "bin"):
                yield from _flat(self.fs, path, self.container, self.token_dtype)
            else:
                column = self.column or ""
                for value, where in _table(self.fs, path, self.container, column):
                    _check_kind(value, self.kind, column, where)
                    yield value


def tokenizer_vocab_size(tokenizer: Any | None) -> int | None:
    """The real vocabulary (base vocab plus added tokens), or None without a tokenizer."""
    return None if tokenizer is None else len(tokenizer)


def open_source(
    source: str, input_format: str | None, column: str | None, token_dtype: str | None
) -> InputSource:
    fs, root = fsspec.core.url_to_fs(source)
    if any(c in root for c in "*?["):
        paths = sorted(p for p in fs.glob(root) if fs.isfile(p))
    elif fs.isdir(root):
        paths = sorted(
            p
            for p in fs.ls(root, detail=False)
            if fs.isfile(p) and (input_format or _ext(p) in CONTAINERS)
        )
    elif fs.exists(root):
        paths = [root]
    else:
        raise InputNotFoundError(f"input data {source!r} does not exist")
    if not paths:
        raise InputNotFoundError(
            f"no input files in {source!r} (known extensions: {', '.join(sorted(CONTAINERS))})"
        )
    containers = {input_format or CONTAINERS.get(_ext(p), "") for p in paths}
    if "" in containers or len(containers) != 1:
        raise InputError(
            f"cannot tell the input format of {source!r} from its file extensions "
            f"({sorted({_ext(p) for p in paths})}); pass input_format (one of "
            f"{sorted(set(CONTAINERS.values()))}) and give files of one format"
        )
    container = containers.pop()
    if container == "txt":
        return InputSource(fs, paths, container, None, DocKind.TEXT, source, None)
    if container in ("npy", "bin"):
        if container == "bin" and token_dtype is None:
            raise InputError(
                f"{source}: a .bin token file has no header; pass token_dtype (e.g. 'uint16' or "
                "'uint32') to say how its ids are stored"
            )
        return InputSource(fs, paths, container, None, DocKind.FLAT, source, token_dtype)
    names = _columns(fs, paths[0], container)
    if column is None:
        column = next((c for c in _DEFAULT_COLUMNS if c in names), None)
        if column is None:
            raise InputError(
                f"{paths[0]} has none of the columns {list(_DEFAULT_COLUMNS)}; columns found: "
                f"{names}; pass column= to name the one to use"
            )
    elif column not in names:
        raise InputError(f"unknown column {column!r} in {paths[0]}; columns found: {names}")
    kind = DocKind.TEXT
    for value, where in _table(fs, paths[0], container, column):
        kind = _kind_of(value, column, where)
        break
    return InputSource(fs, paths, container, column, kind, source, None)


def _ext(path: str) -> str:
    return posixpath.splitext(path)[1].lower()


def _check_kind(value: Any, kind: DocKind, column: str, where: str) -> None:
    """Every value of the column is of the kind its first value showed (one line, not a
    traceback from the tokenizer when a later record holds a number)."""
    ok = (
        isinstance(value, str)
        if kind is DocKind.TEXT
        else isinstance(value, (list, tuple, np.ndarray))
    )
    if not ok:
        raise InputError(
            f"{where}: column {column!r} holds a {type(value).__name__} value "
            f"({str(value)[:40]!r}) where the first record had {kind.value}; fix the record "
            "(text values must be strings: quote numbers)"
        )


def _lines(fs: Any, path: str) -> Iterator[tuple[int, str]]:
    """(line number, text) of a UTF-8 file; invalid UTF-8 is an error naming the line and byte."""
    offset = 0
    with fs.open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputError(
                    f"{path}:{lineno}: not valid UTF-8 (byte offset {offset + e.start}: "
                    f"{e.reason}); re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
                ) from None
            offset += len(raw)
            yield lineno, line.replace("\r\n", "\n")


def _json_line(line: str, path: str, lineno: int) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise InputError(
            f"{path}:{lineno}: not valid JSON ({e}); a .jsonl file holds one JSON object per line"
        ) from None


def _kind_of(value: Any, column: str, where: str) -> DocKind:
    if isinstance(value, str):
        return DocKind.TEXT
    if isinstance(value, (list, tuple, np.ndarray)):
        first = next(iter(value), None)
        if isinstance(first, dict):
            return DocKind.CHAT
        if first is None or isinstance(first, (int, np.integer)):
            return DocKind.TOKENS
    raise InputError(
        f"column {column!r} in {where} holds {type(value).__name__} values; expected text (str), "
        "chat messages (list of {role, content}) or token ids (list of int)"
    )


def _columns(fs: Any, path: str, container: str) -> list[str]:
    if container == "jsonl":
        for lineno, line in _lines(fs, path):
            if line.strip():
                record = _json_line(line, path, lineno)
                return list(record) if isinstance(record, dict) else []
        return []
    with fs.open(path, "rb") as f:
        return list(_arrow_schema(f, container).names)


def _arrow_schema(f: Any, container: str) -> Any:
    import pyarrow.parquet as pq

    if container == "parquet":
        return pq.ParquetFile(f).schema_arrow
    return _ipc_reader(f).schema


def _ipc_reader(f: Any) -> Any:
    import pyarrow as pa

    try:
        return pa.ipc.open_file(f)
    except pa.ArrowInvalid:
        f.seek(0)
        return pa.ipc.open_stream(f)


def _table(fs: Any, path: str, container: str, column: str) -> Iterator[tuple[Any, str]]:
    """(value, where) of each non-null value of ``column``; where is ``path:line`` or
    ``path, row i``."""
    if container == "jsonl":
        for lineno, line in _lines(fs, path):
            if not line.strip():
                continue
            record = _json_line(line, path, lineno)
            if not isinstance(record, dict) or column not in record:
                found = list(record) if isinstance(record, dict) else type(record).__name__
                raise InputError(
                    f"unknown column {column!r} at {path}:{lineno}; columns found: {found}"
                )
            if record[column] is not None:
                yield record[column], f"{path}:{lineno}"
        return
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as f:
        names = list(_arrow_schema(f, container).names)
        if column not in names:
            raise InputError(f"unknown column {column!r} in {path}; columns found: {names}")
        f.seek(0)
        if container == "parquet":
            batches = pq.ParquetFile(f).iter_batches(batch_size=_TABLE_BATCH, columns=[column])
        else:
            reader = _ipc_reader(f)
            batches = (
                (reader.get_batch(i) for i in range(reader.num_record_batches))
                if hasattr(reader, "num_record_batches")
                else iter(reader)
            )
        row = 0
        for batch in batches:
            for value in batch.column(batch.schema.get_field_index(column)).to_pylist():
                if value is not None:
                    yield value, f"{path}, row {row}"
                row += 1


def _txt(fs: Any, path: str) -> Iterator[str]:
    lines: list[str] = []
    for _, line in _lines(fs, path):
        if line.strip():
            lines.append(line)
        elif lines:
            yield "".join(lines).rstrip("\n")
            lines = []
    if lines:
        yield "".join(lines).rstrip("\n")


def _flat(fs: Any, path: str, container: str, token_dtype: str | None) -> Iterator[np.ndarray]:
    with fs.open(path, "rb") as f:
        if container == "npy":
            version = np.lib.format.read_magic(f)
            header = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = header(f)
            if len(shape) != 1 or dtype.kind not in "iu":
                raise InputError(
                    f"{path}: a token .npy must be a 1-D integer array, got shape {shape} dtype "
                    f"{dtype}"
                )
            del fortran
        else:
            dtype = np.dtype(token_dtype)
            if fs.size(path) % dtype.itemsize:
                raise InputError(
                    f"{path}: size {fs.size(path)} bytes is not a multiple of the {dtype} item "
                    f"size {dtype.itemsize}; is token_dtype right?"
                )
        rest = b""
        while block := f.read(_FLAT_CHUNK * dtype.itemsize):
            block = rest + block  # a remote read may return a partial item
            cut = len(block) - len(block) % dtype.itemsize
            rest = block[cut:]
            yield np.frombuffer(block[:cut], dtype=dtype).astype(np.int64)
        if rest:
            raise InputError(f"{path}: ends in a partial {dtype} item; the file is truncated")
