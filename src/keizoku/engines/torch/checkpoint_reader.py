"""A DCP checkpoint's tensors read a byte range at a time, without ever holding a whole tensor: for streaming.

torch.distributed.checkpoint's own reader (``FileSystemReader.read_data``) ``torch.load``\\ s every stored item
whole before copying the part asked for, so an export through it holds the largest tensor twice (an 8B model's
fp32 embedding: 2.1 GB, loaded, then converted; measured 5.8 GB peak RSS). Here each item's raw bytes are located
in its file and read in slices (``Slice``), which several threads can read, convert and write at once.

Where an item lives, as DCP's ``FileSystemWriter`` writes it (serialization format ``TORCH_SAVE``, the default,
and no stream transforms): ``.metadata`` maps each stored chunk of a tensor (``MetadataIndex(fqn, offsets)``) to
``_StorageInfo(relative_path, offset, length)``; those bytes of ``relative_path`` are ``torch.save(chunk)``: a zip
archive, entries stored uncompressed, holding ``<name>/data.pkl`` (the pickled tensor: storage, storage offset,
size, stride) and ``<name>/data/0`` (the storage's bytes, little-endian; DCP clones a view to a minimal storage
before saving). An item is read directly when its storage is exactly the chunk, row-major from offset 0; any other
item (stream transforms, another serialization, a strided chunk) is read whole with ``torch.load`` (memory: that
item), so every checkpoint reads, only some faster. A chunk must cover whole rows (FSDP shards dim 0); a
checkpoint sharded otherwise is not streamed (``StreamError``).

A damaged checkpoint — ``.metadata`` missing or unreadable, a file it lists missing or shorter than the items it
places there, an item that does not load — raises ``CheckpointDamaged`` naming the file (``read_metadata``,
``CheckpointReader.check_files``, ``Slice.read``). Bytes changed inside a tensor's data cannot be told from
weights: DCP records no checksums.
"""

from __future__ import annotations

import math
import os
import pickle
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from keizoku.errors import KeizokuError


class StreamError(KeizokuError, ValueError):
    """A tensor of the checkpoint cannot be read in slices (the caller reads it whole instead)."""


class CheckpointDamaged(KeizokuError, ValueError):
    """A file of the checkpoint is missing, shorter than ``.metadata`` says, or does not load; the message names
    the file (``file``) and what is wrong with it."""

    def __init__(self, file: Path, problem: str):
        super().__init__(f"{file}: {problem}")
        self.file, self.problem = Path(file), problem


def read_metadata(path: Path):
    """The DCP checkpoint's ``.metadata`` (torch's ``Metadata``), or CheckpointDamaged naming it."""
    from torch.distributed.checkpoint import FileSystemReader

    file = Path(path) / ".metadata"
    if not file.is_file():
        raise CheckpointDamaged(file, "missing (it lists where every tensor of the checkpoint is stored)")
    try:
        return FileSystemReader(str(path)).read_metadata()
    except Exception as e:  # noqa: BLE001 - unpickling a damaged file raises many kinds; all mean this
        raise CheckpointDamaged(file, f"unreadable ({type(e).__name__}: {first_sentence(one_line(e))})") from None


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def first_sentence(text: str, limit: int = 200) -> str:
    end = text.find(". ")
    text = text if end < 0 else text[:end + 1]
    return text if len(text) <= limit else text[:limit] + "…"


@dataclass(frozen=True)
class Slice:
    """Elements ``[start, start + numel)`` of a tensor, flattened row-major: where they are stored."""

    fqn: str
    start: int  # in elements of the whole tensor
    numel: int
    dtype: torch.dtype
    file: Path
    data_start: int | None  # file offset of these elements' bytes; None: read the item whole (``item``)
    item: tuple[int, int, int] = (0, 0, 0)  # (item offset, item length, element offset of this slice in the item)

    def read(self) -> torch.Tensor:
        """These elements, 1-D, in the stored dtype."""
        if self.data_start is not None:
            buffer = bytearray(self.numel * self.dtype.itemsize)
            try:
                with open(self.file, "rb", buffering=0) as f:
                    pread_into(f.fileno(), buffer, self.data_start)
            except OSError as e:
                raise CheckpointDamaged(self.file, f"cannot read {self.fqn} ({one_line(e)})") from None
            return torch.frombuffer(buffer, dtype=self.dtype)
        offset, length, first = self.item
        try:
            with open(self.file, "rb") as f:
                whole = torch.load(_FileRange(f, offset, length), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - a damaged item fails torch.load in many ways; all mean this
            raise CheckpointDamaged(self.file, f"its item {self.fqn} (bytes {offset}-{offset + length}) does not "
                                               f"load ({type(e).__name__}: {first_sentence(one_line(e))})") from None
        if not isinstance(whole, torch.Tensor) or whole.numel() < first + self.numel:
            raise CheckpointDamaged(self.file, f"its item {self.fqn} (bytes {offset}-{offset + length}) is not the "
                                               "tensor .metadata describes")
        return whole.reshape(-1)[first:first + self.numel].clone()


class CheckpointReader:
    """The tensors of one DCP checkpoint directory (``.metadata`` read once)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        metadata = read_metadata(self.path)
        self.tensors = metadata.state_dict_metadata
        self.items: dict[str, list] = {}
        for index, info in metadata.storage_data.items():
            self.items.setdefault(index.fqn, []).append((tuple(index.offset or ()), info))
        self._located: dict[tuple[str, int], tuple[int, int] | None] = {}  # (file, item offset) → data start

    def check_files(self, prefix: str = "") -> None:
        """Every file holding the items of the tensors named ``prefix…`` is there and as long as ``.metadata`` says
        (a stat per file): CheckpointDamaged otherwise, before anything is read."""
        ends: dict[str, int] = {}
        for fqn, items in self.items.items():
            if fqn.startswith(prefix):
                for _, info in items:
                    ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
        for name, end in sorted(ends.items()):
            file = self.path / name
            try:
                size = file.stat().st_size
            except FileNotFoundError:
                raise CheckpointDamaged(file, "missing (.metadata lists it)") from None
            if size < end:
                raise CheckpointDamaged(file, f"truncated: {size} bytes, where .metadata places data up to byte {end}")

    def dtype(self, fqn: str) -> torch.dtype:
        return self.tensors[fqn].properties.dtype

    def slices(self, fqn: str, max_bytes: int) -> list[Slice]:
        """The tensor ``fqn`` as slices of at most ``max_bytes`` (an item read whole is one slice), in order."""
        meta = self.tensors[fqn]
        shape, dtype = tuple(meta.size), meta.properties.dtype
        row = math.prod(shape[1:]) if len(shape) > 1 else 1
        out = []
        for offsets, info in sorted(self.items.get(fqn, []), key=lambda item: item[0]):
            chunk = next((c for c in meta.chunks if tuple(c.offsets) == offsets), None)
            sizes = tuple(chunk.sizes) if chunk is not None else shape
            if offsets[1:] != (0,) * (len(shape) - 1) or sizes[1:] != shape[1:]:
                raise StreamError(f"{self.path}: {fqn} is stored in chunks that are not whole rows")
            start, numel = (offsets[0] if offsets else 0) * row, math.prod(sizes)
            file = self.path / info.relative_path
            data_start = self._data_start(file, info, numel * dtype.itemsize)
            if data_start is None:
                out.append(Slice(fqn, start, numel, dtype, file, None, (info.offset, info.length, 0)))
                continue
            step = max(1, max_bytes // dtype.itemsize)
            out += [Slice(fqn, start + i, min(step, numel - i), dtype, file, data_start + i * dtype.itemsize)
                    for i in range(0, numel, step)]
        if sum(s.numel for s in out) != math.prod(shape):
            raise StreamError(f"{self.path}: the stored chunks of {fqn} do not cover it")
        return out

    def _data_start(self, file: Path, info, nbytes: int) -> int | None:
        """The file offset of the item's raw tensor bytes, if it can be read directly (see the module docstring)."""
        key = (str(file), info.offset)
        if key not in self._located:
            self._located[key] = None if info.transform_descriptors else _locate_storage(file, info.offset,
                                                                                     info.length, nbytes)
        return self._located[key]


def _locate_storage(file: Path, offset: int, length: int, nbytes: int) -> int | None:
    """Where, in ``file``, the ``torch.save`` archive at [offset, offset + length) keeps the bytes of its one
    tensor — if the tensor is stored contiguously from its storage's start and the storage is the tensor
    (``nbytes``); else None."""
    try:
        with open(file, "rb") as f:
            archive = zipfile.ZipFile(_FileRange(f, offset, length))
            names = archive.namelist()
            record = next(n for n in names if n.endswith("/data.pkl"))
            storage_offset, size, stride = _tensor_record(archive.read(record))
            data = next(archive.getinfo(n) for n in names if n.endswith("/data/0"))
            if data.compress_type != zipfile.ZIP_STORED or data.file_size != nbytes or storage_offset != 0 \
                    or tuple(stride) != _contiguous_stride(size):
                return None
            f.seek(offset + data.header_offset)
            header = f.read(30)
            if header[:4] != b"PK\x03\x04":
                return None
            name_length, extra_length = struct.unpack("<HH", header[26:30])
            return offset + data.header_offset + 30 + name_length + extra_length
    except (zipfile.BadZipFile, StopIteration, KeyError, pickle.UnpicklingError, ValueError, TypeError,
            OSError):
        return None


def _tensor_record(data: bytes) -> tuple[int, tuple, tuple]:
    """(storage offset, size, stride) of the plain tensor a ``torch.save`` ``data.pkl`` holds; nothing else is
    built (no class but these is accepted)."""

    def rebuild(storage, storage_offset, size, stride, *rest):
        return ("tensor", storage_offset, tuple(size), tuple(stride))

    class Record(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
                return rebuild
            if (module, name) == ("collections", "OrderedDict"):
                return OrderedDict
            if module == "torch" and name.endswith("Storage"):
                return name
            raise pickle.UnpicklingError(f"not a plain tensor: {module}.{name}")

        def persistent_load(self, pid):
            return pid

    import io

    found = Record(io.BytesIO(data)).load()
    if not (isinstance(found, tuple) and found and found[0] == "tensor"):
        raise pickle.UnpicklingError("not a plain tensor")
    return found[1], found[2], found[3]


def _contiguous_stride(size: tuple) -> tuple:
    stride, step = [], 1
    for n in reversed(size):
        stride.append(step)
        step *= n
    return tuple(reversed(stride))


def pread_into(fd: int, buffer: bytearray, offset: int) -> None:
    view = memoryview(buffer)
    while view:
        n = os.preadv(fd, [view], offset)
        if n == 0:
            raise OSError(f"unexpected end of file at offset {offset}")
        view, offset = view[n:], offset + n


class _FileRange:
    """Bytes [start, start + length) of an open file as a seekable file of their own (what zipfile and torch.load
    read)."""

    def __init__(self, f, start: int, length: int):
        self.f, self.start, self.length, self.pos = f, start, length, 0

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = {0: pos, 1: self.pos + pos, 2: self.length + pos}[whence]
        return self.pos

    def read(self, n: int = -1) -> bytes:
        n = self.length - self.pos if n is None or n < 0 else min(n, self.length - self.pos)
        self.f.seek(self.start + self.pos)
        data = self.f.read(n)
        self.pos += len(data)
        return data

    def readline(self, size: int = -1) -> bytes:  # torch.load's legacy (non-zip) path reads a pickle from it
        limit = self.length - self.pos if size is None or size < 0 else min(size, self.length - self.pos)
        self.f.seek(self.start + self.pos)
        line = self.f.readline(limit)
        self.pos += len(line)
        return line

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)
