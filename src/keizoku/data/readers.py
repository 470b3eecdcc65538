"""Input discovery and chunked reading of JSONL (plain, gzip, zstd) and Parquet files.

Readers run in the main process and hand out *chunks*: a few MB of whole lines (or a Parquet record
batch) with the number of their first line, so that every parse error can name ``path:line`` and
worker processes can tokenize chunk by chunk. Reading is cheap next to tokenizing; keeping it in one place
keeps the output order fixed whatever the number of workers.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".jsonl.zstd", ".json", ".json.gz", ".json.zst")
PARQUET_SUFFIXES = (".parquet",)
SUFFIXES = JSONL_SUFFIXES + PARQUET_SUFFIXES


class InputError(Exception):
    """Bad input that stops the run: the message names the file (and line) at fault."""


@dataclass(frozen=True)
class InputFile:
    path: Path
    name: str  # path relative to the directory it was found in (or the file name), without suffix

    @property
    def is_parquet(self) -> bool:
        return self.path.name.endswith(PARQUET_SUFFIXES)


def input_suffix(path: Path) -> str | None:
    name = path.name
    return next((s for s in sorted(SUFFIXES, key=len, reverse=True) if name.endswith(s)), None)


def discover(inputs: list[str]) -> list[InputFile]:
    """Files, directories (recursive) and globs, in a fixed order: as given; sorted within each."""
    found: list[InputFile] = []
    seen: set[Path] = set()

    def add(path: Path, base: Path | None) -> None:
        real = path.resolve()
        if real in seen:
            return
        seen.add(real)
        suffix = input_suffix(path)
        rel = path.relative_to(base) if base is not None else Path(path.name)
        found.append(InputFile(path=path, name=str(rel)[: -len(suffix)]))

    for spec in inputs:
        p = Path(spec)
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and input_suffix(f))
            if not files:
                raise InputError(f"{spec}: directory has no input files ({', '.join(SUFFIXES)})")
            for f in files:
                add(f, p)
        elif p.is_file():
            if input_suffix(p) is None:
                raise InputError(f"{spec}: unsupported file type (expected one of {', '.join(SUFFIXES)})")
            add(p, None)
        elif glob.has_magic(spec):
            files = sorted(Path(f) for f in glob.glob(spec, recursive=True)
                           if Path(f).is_file() and input_suffix(Path(f)))
            if not files:
                raise InputError(f"{spec}: pattern matches no input files")
            for f in files:
                add(f, None)
        else:
            raise InputError(f"{spec}: no such file or directory")
    return found


@dataclass
class Chunk:
    """Whole lines from one file (``data``), or a Parquet record batch (``batch``)."""

    first_line: int
    data: bytes | None = None
    batch: object | None = None  # pyarrow.RecordBatch
    rows: int = 0
    disk_pos: int = 0  # bytes of the file on disk consumed so far (for progress)
    truncated: str | None = None  # set on the last chunk of a file that ended early

    def without_payload(self) -> "Chunk":
        """The same chunk minus its data, to keep in a queue once the data has been parsed."""
        return Chunk(self.first_line, rows=self.rows, disk_pos=self.disk_pos, truncated=self.truncated)


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


def file_sha256(path: Path, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(block):
            h.update(data)
    return h.hexdigest()


class JsonlReader:
    """Yields chunks of whole lines; ``sha256`` is the digest of the file on disk once exhausted."""

    def __init__(self, path: Path, chunk_bytes: int = 4 << 20):
        self.path = path
        self.chunk_bytes = chunk_bytes
        self._raw = _HashingReader(open(path, "rb"))
        name = path.name
        self._kind = "gzip" if name.endswith(".gz") else "zstd" if name.endswith((".zst", ".zstd")) else None

    @property
    def sha256(self) -> str:
        return self._raw.sha.hexdigest()

    def _blocks(self) -> Iterator[bytes]:
        """Decompressed data; raises EOFError/OSError/zlib.error when the stream is cut or corrupt."""
        if self._kind == "gzip":
            # small reads: a cut-off stream raises on the read that hits the cut, losing only that read
            stream = gzip.GzipFile(fileobj=self._raw, mode="rb")
            while block := stream.read(1 << 16):
                yield block
        elif self._kind == "zstd":
            yield from self._zstd_blocks()
        else:
            while block := self._raw.read(self.chunk_bytes):
                yield block

    def _zstd_blocks(self) -> Iterator[bytes]:
        # zstandard's stream_reader returns a cut-off frame as if it were complete; a decompressobj
        # per frame tells us whether the last frame ended
        import zstandard

        dctx = zstandard.ZstdDecompressor()
        dobj, fed = dctx.decompressobj(), False
        while raw := self._raw.read(1 << 20):
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

    def __iter__(self) -> Iterator[Chunk]:
        line = 1
        pending: list[bytes] = []  # decompressed blocks not yet handed out
        size = 0
        blocks = self._blocks()
        try:
            while True:
                try:
                    block = next(blocks, b"")
                except (EOFError, OSError, zlib.error) as e:
                    yield self._truncated(b"".join(pending), line, e)
                    return
                if block:
                    pending.append(block)
                    size += len(block)
                    if size < self.chunk_bytes:
                        continue
                data = b"".join(pending)
                cut = data.rfind(b"\n") + 1 if block else len(data)
                if cut == 0:  # one line longer than a chunk: keep reading
                    pending, size = [data], len(data)
                    continue
                rest = data[cut:]
                pending, size = ([rest], len(rest)) if rest else ([], 0)
                if cut:
                    yield Chunk(first_line=line, data=data[:cut], disk_pos=self._raw.pos)
                    line += data.count(b"\n", 0, cut)
                if not block:
                    return
        finally:
            self._raw.f.close()

    def _truncated(self, carry: bytes, line: int, err: Exception) -> Chunk:
        # complete lines before the damage are kept; the partial last line is not
        cut = carry.rfind(b"\n") + 1
        last_good = line + carry[:cut].count(b"\n") - 1
        what = self._kind or "input"
        return Chunk(first_line=line, data=carry[:cut], disk_pos=self._raw.pos,
                     truncated=f"truncated input: {what} stream cut or corrupt ({err}); data after line {last_good} lost")


class ParquetReader:
    """Yields record batches of the text columns; row numbers count from 1."""

    def __init__(self, path: Path, columns: list[str], rows_per_chunk: int = 4096):
        import pyarrow.parquet as pq

        self.path = path
        try:
            self._file = pq.ParquetFile(path)
        except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid/OSError variants
            raise InputError(f"{path}: cannot read Parquet file: {e}") from e
        names = self._file.schema_arrow.names
        missing = [c for c in columns if c not in names]
        if missing:
            raise InputError(f"{path}: no column {missing[0]!r} (columns: {', '.join(names)})")
        self.columns = columns
        self.rows_per_chunk = rows_per_chunk
        self._size = path.stat().st_size
        self._rows = self._file.metadata.num_rows

    @property
    def sha256(self) -> str:
        return file_sha256(self.path)

    def __iter__(self) -> Iterator[Chunk]:
        row = 1
        for batch in self._file.iter_batches(batch_size=self.rows_per_chunk, columns=self.columns):
            pos = int(self._size * min(1.0, (row - 1 + batch.num_rows) / max(1, self._rows)))
            yield Chunk(first_line=row, batch=batch, rows=batch.num_rows, disk_pos=pos)
            row += batch.num_rows
