"""Input formats of ``keizoku tokenize``: one ``Reader`` class per format, found by file name in one registry.

A reader reads one input file once, front to back, in the main process, and hands out *chunks*: a few MB of
whole lines, or one record batch, each with the number of its first line (row), so that a bad record is
reported as ``path:line`` and worker processes can tokenize chunk by chunk while the output keeps the input's
order. Reading is cheap next to tokenizing.

**The Reader protocol** (``Reader``):

- ``cls(path, keys, chunk_bytes)``: ``keys`` are the fields (columns) that hold the texts, ``chunk_bytes`` about
  how much input one chunk holds. A file that this format cannot read, or that lacks a key's column, may raise
  ``InputError`` here.
- ``iter(reader)``: the file's chunks (``Chunk``), in order. A chunk knows how its records become texts
  (``Chunk.records``): ``Lines`` are whole lines of JSON, ``Rows`` a record batch of columns. A stream that is
  cut or corrupt ends with a chunk of the whole lines before the damage, whose ``truncated`` says so.
- ``reader.sha256``: the SHA-256 of the file as it is on disk, once the iteration has ended.

**The registry**: ``@register(suffix, …)`` on a reader class. What discovery accepts (``suffixes``,
``input_suffix``) and the reader for a file (``reader_for``, ``open_reader``; the longest matching suffix wins)
both come from it: a new format is one class and its ``@register`` line.

Formats: JSON Lines (``.jsonl``, ``.json``: one JSON object a line), gzip- or zstd-compressed (they differ only
in how the bytes are decompressed); Parquet (``.parquet``: the key columns, read a record batch at a time).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Protocol, Sequence

from keizoku.data.records import Record, field_texts, json_texts
from keizoku.errors import KeizokuError

DEFAULT_CHUNK_BYTES = 4 << 20


class InputError(KeizokuError):
    """Bad input that stops the run: the message names the file (and line) at fault."""


# --- chunks ------------------------------------------------------------------------------------------------------

@dataclass
class Chunk:
    """Consecutive records of one file: the number of the first, and how far into the file on disk they end."""

    first_line: int
    disk_pos: int  # bytes of the file on disk read once this chunk was (for progress)
    truncated: str | None = None  # on the last chunk of a stream that is cut or corrupt: what was lost

    @property
    def text_bytes(self) -> int:
        """The input bytes the chunk stands for (what the manifest's ``input_bytes`` adds up)."""
        raise NotImplementedError

    def records(self, keys: Sequence[str]) -> Iterator[Record]:
        """``(line, texts, None)`` for each good record, ``(line, None, reason)`` for each bad one."""
        raise NotImplementedError


@dataclass
class Lines(Chunk):
    """Whole lines of JSON, newline-terminated but perhaps the file's last."""

    data: bytes = b""

    @property
    def text_bytes(self) -> int:
        return len(self.data)

    def records(self, keys: Sequence[str]) -> Iterator[Record]:
        lines = self.data.split(b"\n")
        if lines and not lines[-1]:
            lines.pop()
        for i, line in enumerate(lines):
            yield (self.first_line + i, *json_texts(line, keys))


@dataclass
class Rows(Chunk):
    """A record batch (``pyarrow.RecordBatch``) of the key columns."""

    batch: object = None

    @property
    def text_bytes(self) -> int:
        return self.batch.nbytes

    def records(self, keys: Sequence[str]) -> Iterator[Record]:
        columns = [self.batch.column(self.batch.schema.get_field_index(k)).to_pylist() for k in keys]
        for i, values in enumerate(zip(*columns)):
            yield (self.first_line + i, *field_texts(values, keys, "column "))


# --- the protocol and the registry -------------------------------------------------------------------------------

class Reader(Protocol):
    """One input file, read once (see the module docstring)."""

    path: Path

    def __init__(self, path: Path, keys: Sequence[str], chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None: ...

    def __iter__(self) -> Iterator[Chunk]: ...

    @property
    def sha256(self) -> str: ...


_FORMATS: dict[str, type[Reader]] = {}


def register(*suffixes: str) -> Callable[[type], type]:
    """Class decorator: the class reads files whose names end with one of ``suffixes``."""
    def add(cls: type) -> type:
        for suffix in suffixes:
            _FORMATS[suffix] = cls
        return cls
    return add


def suffixes() -> list[str]:
    """Every file-name suffix a reader is registered for."""
    return list(_FORMATS)


def input_suffix(path: Path | str) -> str | None:
    """The longest registered suffix ``path``'s name ends with; None if it is not an input file."""
    name = Path(path).name
    return max((s for s in _FORMATS if name.endswith(s)), key=len, default=None)


def reader_for(path: Path | str) -> type[Reader]:
    suffix = input_suffix(path)
    if suffix is None:
        raise InputError(f"{path}: unsupported file type (expected one of {', '.join(suffixes())})")
    return _FORMATS[suffix]


def open_reader(path: Path | str, keys: Sequence[str], chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Reader:
    return reader_for(path)(Path(path), keys, chunk_bytes)


# --- JSON Lines ----------------------------------------------------------------------------------------------------

class _HashingReader(io.RawIOBase):
    """Wraps a binary file, hashing every byte read from disk (the input fingerprint)."""

    def __init__(self, f):
        self.f = f
        self.sha = hashlib.sha256()
        self.pos = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self.f.readinto(b)
        if n:
            self.sha.update(memoryview(b)[:n])
            self.pos += n
        return n


@register(".jsonl", ".json")
class JsonlReader:
    """JSON Lines, uncompressed. Subclasses differ only in ``decompressed``: the line chunking is shared."""

    stream = "input"  # what a message about a cut or corrupt stream calls it

    def __init__(self, path: Path, keys: Sequence[str] = (), chunk_bytes: int = DEFAULT_CHUNK_BYTES):
        self.path = Path(path)
        self.chunk_bytes = chunk_bytes
        self._disk: _HashingReader | None = None

    @property
    def sha256(self) -> str:
        return self._disk.sha.hexdigest()

    def decompressed(self, disk: io.RawIOBase) -> Iterator[bytes]:
        """The file's text in blocks; raises EOFError, OSError or zlib.error where the stream is cut or corrupt."""
        while block := disk.read(self.chunk_bytes):
            yield block

    def __iter__(self) -> Iterator[Lines]:
        with open(self.path, "rb") as f:
            self._disk = _HashingReader(f)
            yield from self._line_chunks(self.decompressed(self._disk))

    def _line_chunks(self, blocks: Iterator[bytes]) -> Iterator[Lines]:
        """Cut the text after the last newline once at least ``chunk_bytes`` are pending and a newline came in."""
        line, pending, size = 1, [], 0
        try:
            for block in blocks:
                pending.append(block)
                size += len(block)
                if size >= self.chunk_bytes and b"\n" in block:
                    data = b"".join(pending)
                    cut = data.rfind(b"\n") + 1
                    yield Lines(line, self._disk.pos, data=data[:cut])
                    line += data.count(b"\n", 0, cut)
                    pending, size = [data[cut:]], len(data) - cut
        except (EOFError, OSError, zlib.error) as e:
            yield self._damaged(b"".join(pending), line, e)
            return
        if size:  # the rest: the last line has no newline, or the text was shorter than a chunk
            yield Lines(line, self._disk.pos, data=b"".join(pending))

    def _damaged(self, data: bytes, line: int, err: Exception) -> Lines:
        """The whole lines before the damage; the partial last line is lost."""
        cut = data.rfind(b"\n") + 1
        last_good = line + data.count(b"\n", 0, cut) - 1
        return Lines(line, self._disk.pos, data=data[:cut],
                     truncated=f"truncated input: {self.stream} stream cut or corrupt ({err}); "
                               f"data after line {last_good} lost")


@register(".jsonl.gz", ".json.gz")
class GzipJsonlReader(JsonlReader):
    """JSON Lines, gzip-compressed (one member or several)."""

    stream = "gzip"

    def decompressed(self, disk: io.RawIOBase) -> Iterator[bytes]:
        # small reads: a cut-off stream raises on the read that hits the cut, losing only that read
        stream = gzip.GzipFile(fileobj=disk, mode="rb")
        while block := stream.read(1 << 16):
            yield block


@register(".jsonl.zst", ".jsonl.zstd", ".json.zst")
class ZstdJsonlReader(JsonlReader):
    """JSON Lines, zstd-compressed (one frame or several)."""

    stream = "zstd"

    def decompressed(self, disk: io.RawIOBase) -> Iterator[bytes]:
        # zstandard's stream_reader returns a cut-off frame as if it were complete; a decompressobj per frame
        # tells whether the last frame ended
        import zstandard

        dctx = zstandard.ZstdDecompressor()
        dobj, fed = dctx.decompressobj(), False
        while raw := disk.read(1 << 20):
            while raw:
                try:
                    out = dobj.decompress(raw)
                except zstandard.ZstdError as e:
                    raise OSError(f"corrupt zstd data: {e}") from e
                fed = True
                if out:
                    yield out
                if dobj.eof:
                    raw = dobj.unused_data
                    dobj, fed = dctx.decompressobj(), False
                else:
                    raw = b""
        if fed:
            raise EOFError("zstd stream ended inside a frame")


# --- Parquet -------------------------------------------------------------------------------------------------------

@register(".parquet")
class ParquetReader:
    """Parquet: the key columns, a record batch of ``chunk_bytes / 1 KiB`` rows at a time; rows count from 1."""

    def __init__(self, path: Path, keys: Sequence[str], chunk_bytes: int = DEFAULT_CHUNK_BYTES):
        import pyarrow.parquet as pq

        self.path = Path(path)
        try:
            self._file = pq.ParquetFile(path)
        except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid/OSError variants
            raise InputError(f"{path}: cannot read Parquet file: {e}") from e
        names = self._file.schema_arrow.names
        missing = [k for k in keys if k not in names]
        if missing:
            raise InputError(f"{path}: no column {missing[0]!r} (columns: {', '.join(names)})")
        self.keys = list(keys)
        self.rows_per_chunk = max(1, chunk_bytes >> 10)

    @property
    def sha256(self) -> str:
        return file_sha256(self.path)

    def __iter__(self) -> Iterator[Rows]:
        size, total, row = self.path.stat().st_size, max(1, self._file.metadata.num_rows), 1
        for batch in self._file.iter_batches(batch_size=self.rows_per_chunk, columns=self.keys):
            pos = int(size * min(1.0, (row - 1 + batch.num_rows) / total))
            yield Rows(row, pos, batch=batch)
            row += batch.num_rows


def file_sha256(path: Path, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(block):
            h.update(data)
    return h.hexdigest()
