"""Input formats of ``keizoku tokenize``: one ``Reader`` class per format, found by file name in one registry.

A reader reads one input file once, front to back, in the main process, and hands out *chunks*: a few MB of
whole lines (of an uncompressed file: the span of the file they are in), or one record batch, so that worker
processes can parse and tokenize chunk by chunk while the output keeps the input's order. Records are numbered
within their chunk; the pipeline, which has the chunks in order, makes that ``path:line``. Reading is cheap
next to tokenizing.

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
import os
import queue
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
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
    """Consecutive records of one file, and how far into the file on disk they end. Records are numbered from 1
    within their chunk: counting a file's lines is left to whoever has the chunks in order (the pipeline)."""

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
    """Whole lines of JSON, newline-terminated but perhaps the file's last: held as ``data``, or — for an
    uncompressed file — as the ``span`` (path, offset, length) of the file they are in, which whoever parses
    them reads (a worker process: the lines never travel between processes)."""

    data: bytes = b""
    span: tuple[str, int, int] | None = None

    @property
    def text_bytes(self) -> int:
        return self.span[2] if self.span is not None else len(self.data)

    def records(self, keys: Sequence[str]) -> Iterator[Record]:
        lines = self.read().split(b"\n")
        if lines and not lines[-1]:
            lines.pop()
        for i, line in enumerate(lines):
            yield (i + 1, *json_texts(line, keys))

    def read(self) -> bytes:
        """The lines' bytes."""
        if self.span is None:
            return self.data
        path, offset, length = self.span
        with open(path, "rb") as f:
            data = os.pread(f.fileno(), length, offset)
        if len(data) != length:
            raise InputError(f"{path}: the file changed while it was read (shorter than at {offset + length:,} bytes)")
        return data


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
            yield (i + 1, *field_texts(values, keys, "column "))


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
    """Wraps a binary file, hashing every byte read from disk (the input fingerprint). The hashing runs on a thread
    of its own (SHA-256 lets go of the GIL), beside the main process's reading and writing: a GB takes ~1 s."""

    def __init__(self, f):
        self.f = f
        self.pos = 0
        self._sha = hashlib.sha256()
        self._hashing = ThreadPoolExecutor(1, thread_name_prefix="keizoku-sha256")
        self._pending: list = []  # at most a few blocks wait to be hashed: memory stays bounded

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self.f.read(size)
        self._hash(data)
        return data

    def readinto(self, b) -> int:
        n = self.f.readinto(b)
        if n:
            self._hash(bytes(memoryview(b)[:n]))  # a copy: the caller reuses b
        return n

    def _hash(self, data: bytes) -> None:
        if data:
            self._pending = [f for f in self._pending if not f.done()]
            if len(self._pending) >= 4:
                self._pending.pop(0).result()
            self._pending.append(self._hashing.submit(self._sha.update, data))
            self.pos += len(data)

    def hexdigest(self) -> str:
        """The SHA-256 of everything read, once the hashing has caught up."""
        self._hashing.shutdown(wait=True)
        return self._sha.hexdigest()

    def close(self) -> None:
        self._hashing.shutdown(wait=False, cancel_futures=True)
        super().close()


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
        return self._disk.hexdigest()

    def decompressed(self, disk: io.RawIOBase) -> Iterator[bytes]:
        """The file's text in blocks; raises EOFError, OSError or zlib.error where the stream is cut or corrupt."""
        while block := disk.read(self.chunk_bytes):
            yield block

    def __iter__(self) -> Iterator[Lines]:
        with open(self.path, "rb") as f:
            self._disk = _HashingReader(f)
            yield from self._line_chunks(self.decompressed(self._disk))

    def _line_chunks(self, blocks: Iterator[bytes]) -> Iterator[Lines]:
        """Cut the text after the last newline once at least ``chunk_bytes`` are pending and a newline came in.
        Uncompressed, a chunk is the span of the file it covers (text offsets are file offsets)."""
        spans = type(self).decompressed is JsonlReader.decompressed  # a subclass decompresses: no spans
        pending, size, offset = [], 0, 0

        def chunk(data: bytes, end: int) -> Lines:
            if spans:
                return Lines(self._disk.pos, span=(str(self.path), offset, end))
            return Lines(self._disk.pos, data=data[:end])

        try:
            for block in blocks:
                pending.append(block)
                size += len(block)
                if size >= self.chunk_bytes and b"\n" in block:
                    data = b"".join(pending)
                    cut = data.rfind(b"\n") + 1
                    yield chunk(data, cut)
                    offset += cut
                    pending, size = [data[cut:]], len(data) - cut
        except (EOFError, OSError, zlib.error) as e:
            yield self._damaged(b"".join(pending), e)
            return
        if size:  # the rest: the last line has no newline, or the text was shorter than a chunk
            yield chunk(b"".join(pending), size)

    def _damaged(self, data: bytes, err: Exception) -> Lines:
        """The whole lines before the damage; the partial last line is lost (the pipeline, which counts the lines,
        adds after which one)."""
        cut = data.rfind(b"\n") + 1
        return Lines(self._disk.pos, data=data[:cut],
                     truncated=f"truncated input: {self.stream} stream cut or corrupt ({err})")


@register(".jsonl.gz", ".json.gz")
class GzipJsonlReader(JsonlReader):
    """JSON Lines, gzip-compressed (one member or several)."""

    stream = "gzip"

    def decompressed(self, disk: io.RawIOBase) -> Iterator[bytes]:
        return in_background(gunzip(disk))


@register(".jsonl.zst", ".jsonl.zstd", ".json.zst")
class ZstdJsonlReader(JsonlReader):
    """JSON Lines, zstd-compressed (one frame or several)."""

    stream = "zstd"

    def decompressed(self, disk: io.RawIOBase) -> Iterator[bytes]:
        return in_background(unzstd(disk))


# --- decompression -------------------------------------------------------------------------------------------------
# The main process decompresses every byte of a .gz's or .zst's text, and with many workers how fast it hands out
# chunks bounds the run: so it uses the fastest inflater installed (python-isal's runs 2-3x as fast as the zlib
# module's; bench/tokenize/decompress_speed.py), and decompresses on a thread of its own, a few blocks ahead of the
# line chunking (isal, zlib and zstandard let go of the GIL while they work), which takes the decompression off the
# reading thread's time. Damage raises EOFError, OSError or zlib.error, whichever library decompresses, after every
# block before it.

_READ = 1 << 16  # gzip: output bytes per read. A read that hits a cut or damage raises, losing only its own bytes
_ZSTD_READ = 1 << 17  # zstd: compressed bytes per decompress call (more runs slower: its output leaves the cache)
_BLOCK = 1 << 20  # what the decompressing thread hands over at a time
_AHEAD = 8  # blocks it may have decompressed ahead of the reader


@cache
def _gzip_impl() -> tuple[type, tuple[type[BaseException], ...], str]:
    """(the GzipFile class, its inflater's own error for corrupt data, its name) of the fastest library here."""
    try:
        import isal
        from isal import igzip, isal_zlib
    except ImportError:
        return gzip.GzipFile, (), f"zlib {zlib.ZLIB_RUNTIME_VERSION}"
    return igzip.GzipFile, (isal_zlib.error,), f"isal {isal.__version__}"


def decompressor(stream: str) -> str:
    """The library (and its version) that decompresses ``stream`` ("gzip" or "zstd") here, e.g. ``isal 1.9.1``:
    python-isal where it is installed (a dependency of keizoku where it has wheels), else Python's zlib module."""
    if stream == "gzip":
        return _gzip_impl()[2]
    if stream == "zstd":
        import zstandard

        return f"zstandard {zstandard.__version__}"
    raise ValueError(f"no decompressor for {stream!r}")


def gunzip(raw: io.RawIOBase, stdlib: bool = False) -> Iterator[bytes]:
    """The text of a gzip stream (one member or several, empty ones, zero padding after a member: as the ``gzip``
    module reads it), in blocks of at most ``_READ`` bytes; ``stdlib``: with the ``gzip`` module whatever is
    installed. A cut stream raises EOFError, a corrupt one OSError (``gzip.BadGzipFile``) or zlib.error."""
    gzipfile, errors, _ = (gzip.GzipFile, (), "") if stdlib else _gzip_impl()
    stream = gzipfile(fileobj=raw, mode="rb")
    try:
        while block := stream.read(_READ):
            yield block
    except errors as e:  # isal's own class for what zlib calls zlib.error
        raise zlib.error(str(e)) from e


def unzstd(raw: io.RawIOBase) -> Iterator[bytes]:
    """The text of a zstd stream (one frame or several). A cut stream raises EOFError, a corrupt one OSError."""
    # zstandard's stream_reader returns a cut-off frame as if it were complete; a decompressobj per frame
    # tells whether the last frame ended
    import zstandard

    dctx = zstandard.ZstdDecompressor()
    dobj, fed = dctx.decompressobj(), False
    while data := raw.read(_ZSTD_READ):
        while data:
            try:
                out = dobj.decompress(data)
            except zstandard.ZstdError as e:
                raise OSError(f"corrupt zstd data: {e}") from e
            fed = True
            if out:
                yield out
            if dobj.eof:
                data = dobj.unused_data
                dobj, fed = dctx.decompressobj(), False
            else:
                data = b""
    if fed:
        raise EOFError("zstd stream ended inside a frame")


@dataclass
class _Raised:  # what the decompressing thread raised, for the reader to raise
    error: BaseException


def in_background(blocks: Iterator[bytes], size: int = _BLOCK, ahead: int = _AHEAD) -> Iterator[bytes]:
    """``blocks``, joined into blocks of about ``size`` bytes, produced on a thread of its own at most ``ahead``
    blocks ahead of the caller. What ``blocks`` raises is raised here, after the blocks it produced before.
    Closing the generator (or its end) stops the thread before it returns: the file it reads can then close."""
    handover: queue.Queue = queue.Queue(ahead)
    stop = threading.Event()
    done = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                handover.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def produce() -> None:
        pending, n = [], 0
        try:
            for block in blocks:
                pending.append(block)
                n += len(block)
                if n >= size:
                    if not put(b"".join(pending)):
                        return
                    pending, n = [], 0
            if not pending or put(b"".join(pending)):
                put(done)
        except BaseException as e:  # noqa: BLE001 - handed to the reader, which raises it
            if not pending or put(b"".join(pending)):
                put(_Raised(e))
        finally:
            close = getattr(blocks, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name="keizoku-decompress", daemon=True)
    thread.start()
    try:
        while (item := handover.get()) is not done:
            if isinstance(item, _Raised):
                raise item.error
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # a put waiting for room sees the stop within 0.1 s; free it at once
            try:
                handover.get_nowait()
            except queue.Empty:
                thread.join(0.01)


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
            yield Rows(pos, batch=batch)
            row += batch.num_rows


def file_sha256(path: Path, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(block):
            h.update(data)
    return h.hexdigest()
