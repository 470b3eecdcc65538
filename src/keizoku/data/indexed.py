"""Writer for Megatron's indexed dataset format (``MMIDIDX``), byte-identical to megatron-core.

A dataset is a pair of files sharing a path prefix ``P``:

``P.bin``
    Every document's token ids, concatenated, in the dataset's dtype (little endian, no header).

``P.idx`` (all integers little endian)
    ====================  =========================================================================
    9 bytes               magic ``b"MMIDIDX\\x00\\x00"``
    uint64                format version, always 1
    uint8                 dtype code: 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64,
                          7 float32, 8 uint16
    uint64                S, number of sequences
    uint64                D, number of entries in the document index (documents + 1)
    int32[S]              length of each sequence, in tokens
    int64[S]              byte offset of each sequence in ``P.bin``
    int64[D]              document index: sequence number at which each document starts; begins
                          with 0 and ends with S
    ====================  =========================================================================

Megatron's ``preprocess_data.py`` (without ``--split-sentences``) writes one sequence per non-empty
document and *no* sequence for an empty one, so an empty document shows up as a repeated entry in the
document index. This writer does the same (a document of length 0 adds no sequence).

The dtype is what Megatron's ``DType.optimal_dtype`` picks: ``uint16`` when the vocabulary has fewer
than 65,500 entries, else ``int32``.

Concatenating (``concatenate``, what ``keizoku tokenize-merge`` and Megatron's ``tools/merge_datasets.py`` do):
the ``.bin`` files are copied one after another (``os.copy_file_range``: in the kernel, a reflink where the file
system has them, at disk speed) and the index is rebuilt from the parts' indices alone — lengths as they are,
each part's byte offsets moved by the ``.bin`` bytes before it, its document index by the sequences before it —
so the result is, byte for byte, what one writer given all the parts' documents in order writes. A single part
is hard-linked (its files never change in place: a writer replaces them by rename), or copied where links
cannot be made.

Why not megatron-core's ``IndexedDatasetBuilder``: it takes one Python list per document and keeps
every sequence length in Python lists until ``finalize`` (tens of bytes per document; billions of
documents do not fit). This writer takes whole chunks as numpy arrays, spills the lengths to a side
file and streams the index out in blocks, so memory stays bounded by the block size. The tests check
its output byte for byte against megatron-core's builder and read it back with ``IndexedDataset``.
"""

from __future__ import annotations

import errno
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from keizoku.rundir import discard, publish, staging_path

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
DTYPE_CODES = {
    np.dtype(np.uint8): 1,
    np.dtype(np.int8): 2,
    np.dtype(np.int16): 3,
    np.dtype(np.int32): 4,
    np.dtype(np.int64): 5,
    np.dtype(np.float64): 6,
    np.dtype(np.float32): 7,
    np.dtype(np.uint16): 8,
}
_HEADER_BYTES = len(INDEX_MAGIC) + 8 + 1 + 8 + 8  # magic, version, dtype code, S, D
_BLOCK = 1 << 20  # documents per block when streaming the index


def optimal_dtype(vocab_size: int) -> np.dtype:
    """The token dtype Megatron uses for a vocabulary of this size."""
    return np.dtype(np.uint16) if vocab_size is not None and vocab_size < 65500 else np.dtype(np.int32)


def dataset_paths(prefix: str | os.PathLike) -> tuple[Path, Path]:
    prefix = str(prefix)
    return Path(prefix + ".bin"), Path(prefix + ".idx")


class IndexedDatasetWriter:
    """Appends documents chunk by chunk, then publishes ``.bin`` and ``.idx`` (``rundir.publish``).

    Until ``finalize`` everything is under staging names beside the final ones (``rundir.staging_path``): the
    token ids in ``.tmp.P.bin``, each document's length in ``.tmp.P.lengths`` (scratch, deleted at the end).
    ``finalize`` streams the index into ``.tmp.P.idx`` and renames ``.bin`` first, then ``.idx``, so a pair that
    exists under its final names is always complete. ``abort`` removes the staged files. A dataset has one
    writer at a time, so its staging names carry no process id: a run after a killed one writes over what the
    killed one left.
    """

    def __init__(self, prefix: str | os.PathLike, dtype: np.dtype):
        self.prefix = str(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in DTYPE_CODES:
            raise ValueError(f"unsupported dtype {self.dtype}")
        self.bin_path, self.idx_path = dataset_paths(self.prefix)
        self._staged_bin, self._staged_idx, self._lengths_path = (
            staging_path(p, tag="") for p in (self.bin_path, self.idx_path, Path(self.prefix + ".lengths")))
        self.bin_path.parent.mkdir(parents=True, exist_ok=True)
        self._bin = open(self._staged_bin, "wb")
        self._lengths = open(self._lengths_path, "wb")
        self.documents = 0
        self.tokens = 0
        self.empty_documents = 0
        self._unsynced, self._syncing = 0, None

    # what is written goes to disk while writing goes on, on a thread of its own: publishing's fsync then finds
    # little left to write (it was ~0.4 s at the end of a 4 GB run)
    WRITEBACK_BYTES = 256 << 20

    def add_chunk(self, tokens: np.ndarray, doc_lengths: np.ndarray) -> None:
        """Append documents: ``tokens`` concatenated, ``doc_lengths[i]`` tokens each (0 = empty)."""
        doc_lengths = np.asarray(doc_lengths, dtype=np.int32)
        if int(doc_lengths.sum(dtype=np.int64)) != len(tokens):
            raise ValueError("document lengths do not add up to the number of tokens")
        data = np.ascontiguousarray(tokens, dtype=self.dtype)
        self._bin.write(data.data)
        self._lengths.write(doc_lengths.data)
        self.documents += len(doc_lengths)
        self.tokens += len(tokens)
        self.empty_documents += int(np.count_nonzero(doc_lengths == 0))
        self._unsynced += data.nbytes
        if self._unsynced >= self.WRITEBACK_BYTES and not (self._syncing and self._syncing.is_alive()):
            self._bin.flush()
            self._syncing = threading.Thread(target=os.fdatasync, args=(self._bin.fileno(),), daemon=True)
            self._syncing.start()
            self._unsynced = 0

    def _wait_writeback(self) -> None:
        if self._syncing is not None:
            self._syncing.join()

    def finalize(self) -> None:
        self._wait_writeback()
        self._bin.close()
        self._lengths.close()
        with open(self._staged_idx, "wb") as idx:
            self._write_index(idx)
        publish(self._staged_bin, self.bin_path, replace=True)
        publish(self._staged_idx, self.idx_path, replace=True)
        self._lengths_path.unlink(missing_ok=True)

    def abort(self) -> None:
        self._wait_writeback()
        for f in (self._bin, self._lengths):
            if not f.closed:
                f.close()
        for p in (self._staged_bin, self._lengths_path, self._staged_idx):
            p.unlink(missing_ok=True)

    def _write_index(self, idx) -> None:
        """The header, then three passes over the spilled lengths: lengths, byte offsets, document index."""
        idx.write(INDEX_MAGIC)
        idx.write(struct.pack("<Q", INDEX_VERSION))
        idx.write(struct.pack("<B", DTYPE_CODES[self.dtype]))
        idx.write(struct.pack("<Q", self.documents - self.empty_documents))
        idx.write(struct.pack("<Q", self.documents + 1))
        for block in self._length_blocks():
            idx.write(block[block > 0].data)
        self._write_pointers(idx)
        idx.write(np.zeros(1, dtype=np.int64).data)
        seen = 0
        for block in self._length_blocks():
            counts = np.cumsum(block > 0, dtype=np.int64) + seen
            if len(counts):
                seen = int(counts[-1])
            idx.write(counts.data)

    def _write_pointers(self, idx) -> None:
        """Each sequence's byte offset in ``.bin``."""
        offset, itemsize = 0, self.dtype.itemsize
        for block in self._length_blocks():
            seq = block[block > 0].astype(np.int64)
            pointers = np.empty(len(seq), dtype=np.int64)
            if len(seq):
                pointers[0] = offset
                np.cumsum(seq[:-1] * itemsize, out=pointers[1:])
                pointers[1:] += offset
                offset += int(seq.sum()) * itemsize
            idx.write(pointers.data)

    def _length_blocks(self):
        with open(self._lengths_path, "rb") as f:
            while True:
                raw = f.read(_BLOCK * 4)
                if not raw:
                    return
                yield np.frombuffer(raw, dtype=np.int32)


def read_index_header(idx_path: str | os.PathLike) -> dict:
    """Header fields of an ``.idx`` file: dtype, sequence count, document count."""
    with open(idx_path, "rb") as f:
        head = f.read(_HEADER_BYTES)
    if not head.startswith(INDEX_MAGIC):
        raise ValueError(f"{idx_path}: not a Megatron MMIDIDX index (bad magic)")
    (version,) = struct.unpack_from("<Q", head, 9)
    (code,) = struct.unpack_from("<B", head, 17)
    (sequences,) = struct.unpack_from("<Q", head, 18)
    (doc_entries,) = struct.unpack_from("<Q", head, 26)
    dtype = {v: k for k, v in DTYPE_CODES.items()}[code]
    return {"version": version, "dtype": dtype, "sequences": sequences, "documents": doc_entries - 1}


class IndexedDatasetReader:
    """Memory-mapped read access for ``keizoku inspect`` (training reads with megatron-core itself)."""

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = str(prefix)
        self.bin_path, self.idx_path = dataset_paths(self.prefix)
        header = read_index_header(self.idx_path)
        self.dtype = header["dtype"]
        s, d = header["sequences"], header["documents"] + 1
        offset = _HEADER_BYTES
        idx = np.memmap(self.idx_path, mode="r", dtype=np.uint8)
        self.sequence_lengths = np.frombuffer(idx, dtype=np.int32, count=s, offset=offset)
        offset += 4 * s
        self.sequence_pointers = np.frombuffer(idx, dtype=np.int64, count=s, offset=offset)
        offset += 8 * s
        self.document_indices = np.frombuffer(idx, dtype=np.int64, count=d, offset=offset)
        self._bin = np.memmap(self.bin_path, mode="r", dtype=self.dtype) if self.bin_path.stat().st_size else \
            np.zeros(0, dtype=self.dtype)

    def __len__(self) -> int:
        return len(self.document_indices) - 1

    def document_lengths(self) -> np.ndarray:
        """Tokens per document (0 for an empty document)."""
        cum = np.concatenate([[0], np.cumsum(self.sequence_lengths, dtype=np.int64)])
        return np.diff(cum[self.document_indices])

    def document(self, i: int) -> np.ndarray:
        first, last = int(self.document_indices[i]), int(self.document_indices[i + 1])
        if first == last:
            return np.zeros(0, dtype=self.dtype)
        start = int(self.sequence_pointers[first]) // self.dtype.itemsize
        n = int(self.sequence_lengths[first:last].sum())
        return np.asarray(self._bin[start:start + n])


@dataclass
class Concatenated:
    """What ``concatenate`` wrote."""

    documents: int
    empty_documents: int
    tokens: int
    dtype: np.dtype
    bin_bytes: int
    idx_bytes: int
    linked: bool  # one part, hard-linked rather than copied


def concatenate(parts: list[str | os.PathLike], prefix: str | os.PathLike) -> Concatenated:
    """Write ``prefix.bin``/``.idx``: the datasets ``parts`` (prefixes, all of one dtype), in order, as one (see the
    module docstring). Written under staging names and published (``.bin``, then ``.idx``); a dataset already at
    ``prefix`` loses its ``.idx`` first, so no reader pairs the new ``.bin`` with the old index."""
    if not parts:
        raise ValueError("nothing to concatenate")
    headers = [read_index_header(dataset_paths(p)[1]) for p in parts]
    dtypes = {h["dtype"] for h in headers}
    if len(dtypes) != 1:
        raise ValueError(f"parts of different dtypes ({', '.join(sorted(map(str, dtypes)))}) cannot be concatenated")
    dtype = dtypes.pop()
    bin_path, idx_path = dataset_paths(prefix)
    bin_path.parent.mkdir(parents=True, exist_ok=True)
    staged_bin, staged_idx = staging_path(bin_path), staging_path(idx_path)
    try:
        linked = len(parts) == 1 and _link(parts[0], staged_bin, staged_idx)
        if not linked:
            _concatenate(parts, headers, dtype, staged_bin, staged_idx)
        discard(idx_path)
        publish(staged_bin, bin_path, replace=True)
        publish(staged_idx, idx_path, replace=True)
    except BaseException:
        for staged in (staged_bin, staged_idx):
            staged.unlink(missing_ok=True)
        raise
    sequences = sum(h["sequences"] for h in headers)
    documents = sum(h["documents"] for h in headers)
    return Concatenated(documents, documents - sequences, bin_path.stat().st_size // dtype.itemsize, dtype,
                        bin_path.stat().st_size, idx_path.stat().st_size, linked)


def _link(part: str | os.PathLike, staged_bin: Path, staged_idx: Path) -> bool:
    """Hard-link one part's files to the staging names; False (nothing left behind) where links cannot be made."""
    made = []
    try:
        for src, dst in zip(dataset_paths(part), (staged_bin, staged_idx)):
            dst.unlink(missing_ok=True)
            os.link(src, dst)
            made.append(dst)
    except OSError:
        for dst in made:
            dst.unlink(missing_ok=True)
        return False
    return True


def _concatenate(parts, headers: list[dict], dtype: np.dtype, staged_bin: Path, staged_idx: Path) -> None:
    with open(staged_bin, "wb", buffering=0) as out:
        for p in parts:
            src = dataset_paths(p)[0]
            with open(src, "rb", buffering=0) as f:
                copy_file(f.fileno(), out.fileno(), 0, os.fstat(f.fileno()).st_size)
    total_seq = sum(h["sequences"] for h in headers)
    total_docs = sum(h["documents"] for h in headers)
    with open(staged_idx, "wb", buffering=0) as out:
        fd = out.fileno()
        _write_all(fd, INDEX_MAGIC + struct.pack("<Q", INDEX_VERSION) + struct.pack("<B", DTYPE_CODES[dtype])
                   + struct.pack("<Q", total_seq) + struct.pack("<Q", total_docs + 1))
        for p, h in zip(parts, headers):  # lengths: as they are
            with open(dataset_paths(p)[1], "rb", buffering=0) as f:
                copy_file(f.fileno(), fd, _HEADER_BYTES, 4 * h["sequences"])
        byte_offset = 0
        for p, h in zip(parts, headers):  # byte offsets: moved by the .bin bytes before the part
            s = h["sequences"]
            for block in _index_blocks(p, np.int64, _HEADER_BYTES + 4 * s, s):
                _write_all(fd, (block + byte_offset).tobytes())
            byte_offset += dataset_paths(p)[0].stat().st_size
        _write_all(fd, np.zeros(1, dtype=np.int64).tobytes())
        seq_offset = 0
        for p, h in zip(parts, headers):  # document index: moved by the sequences before the part, without its 0
            s = h["sequences"]
            for block in _index_blocks(p, np.int64, _HEADER_BYTES + 12 * s + 8, h["documents"]):
                _write_all(fd, (block + seq_offset).tobytes())
            seq_offset += s


def _index_blocks(prefix, dtype, offset: int, count: int):
    """``count`` items of ``dtype`` from byte ``offset`` of ``prefix.idx``, a block at a time."""
    itemsize = np.dtype(dtype).itemsize
    with open(dataset_paths(prefix)[1], "rb") as f:
        f.seek(offset)
        while count > 0:
            n = min(count, _BLOCK)
            raw = f.read(n * itemsize)
            if len(raw) != n * itemsize:
                raise ValueError(f"{dataset_paths(prefix)[1]}: shorter than its header says")
            yield np.frombuffer(raw, dtype=dtype)
            count -= n


def copy_file(src: int, dst: int, offset: int, count: int) -> None:
    """Append ``count`` bytes from ``offset`` of file descriptor ``src`` at ``dst``'s position: in the kernel
    (``os.copy_file_range``), else through 16 MiB buffers."""
    fast = hasattr(os, "copy_file_range")
    while count > 0:
        if fast:
            try:
                n = os.copy_file_range(src, dst, count, offset)
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM, errno.EBADF):
                    raise
                fast = False
                continue
        else:
            data = os.pread(src, min(count, 16 << 20), offset)
            n = len(data)
            if n:
                _write_all(dst, data)
        if n == 0:
            raise ValueError(f"a file ended {count:,} bytes before its size said while it was copied")
        offset += n
        count -= n


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
