"""The tokenize pipeline: output groups in, published datasets out, with worker processes tokenizing.

This process reads each group's inputs chunk by chunk (``readers``) and hands each chunk to a worker
(``encode_chunk``), which parses its records (``records``) and tokenizes their texts; an uncompressed file's chunk
travels as the span of the file it covers, which the worker reads itself. The ids come back as futures and are
written strictly in input order (``_in_order``), at most ``2 × workers + 1`` chunks ahead, reading on across
file and group boundaries so that the workers never wait for a group to be published. A group's datasets are published when its last chunk
is written: ``.bin``/``.idx`` renamed into place (``IndexedDatasetWriter.finalize``), then the manifest entry.
Bad input stops the run at the first bad record, in input order (``TokenizeError``), unless skipped.

While the exact fast BPE path is not yet verified (``Prepared.fallback``), a worker — or a side process, with
one worker — checks it against Hugging Face while the others tokenize, and nothing is published before the
check has passed; if it fails (``FastPathRejected``) the caller starts again with Hugging Face's encoder.
"""

from __future__ import annotations

import mmap
import multiprocessing
import signal
import sys
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from keizoku.data.indexed import IndexedDatasetWriter
from keizoku.data.inputs import InputFile
from keizoku.data.manifest import Skipped, dataset_entry, entry_name, update_manifest
from keizoku.data.progress import Progress
from keizoku.data.readers import Chunk, Lines
from keizoku.data.records import encode_json_lines, parse_chunk
from keizoku.data.shards import open_input
from keizoku.data.tokenizer import EncoderSpec, Prepared, TextEncoder, TokenizerInfo, check_fast_path, encoder_for
from keizoku.errors import KeizokuError


class TokenizeError(KeizokuError):
    """A run stopped on bad input; the message is ``path:line: what was wrong``."""


class FastPathRejected(Exception):
    """The deferred check found that the fast BPE path would not give Hugging Face's ids."""


@dataclass
class DatasetGroup:
    """One output unit: an input file (--output-dir) or all inputs (--output-prefix), one dataset per key."""

    name: str
    inputs: list[InputFile]
    prefixes: dict[str, str]  # key -> dataset prefix (absolute)


@dataclass
class DatasetResult:
    name: str
    key: str
    prefix: str
    documents: int = 0
    tokens: int = 0
    input_bytes: int = 0
    seconds: float = 0.0
    skipped: int = 0
    up_to_date: bool = False


@dataclass
class Job:
    """What writing the datasets needs besides the groups and the tokenizer."""

    keys: list[str]
    skip: bool  # --on-error skip
    chunk_bytes: int
    bos: int | None
    eod: int | None
    workers: int
    manifest_path: Path
    flags: dict  # the manifest entries' "flags"
    sample: list[str]  # texts to check an unverified fast path on
    console: object = None
    progress: bool = True
    log: Callable[[str], None] = print


def write_datasets(groups: list[DatasetGroup], prep: Prepared, job: Job) -> list[DatasetResult]:
    """Tokenize ``groups`` with ``job.workers`` processes; this one reads, parses and writes (as
    ``preprocess_data.py``'s main process reads and writes around its workers)."""
    global _ENCODER, _SLOTS, _INPUTS
    _ENCODER = encoder_for(prep.spec)  # forked workers inherit it; spawned ones build it in _init_worker
    fork = "fork" in multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if fork else "spawn")
    # one worker: tokenize here, no inter-process traffic at all
    pool = ProcessPoolExecutor(job.workers, mp_context=ctx, initializer=_init_worker, initargs=(prep.spec,)) \
        if job.workers > 1 else None
    # made before the pool forks its workers (on the first submit), which then share it
    _SLOTS = _Slots(_window(job) + 1, 4 * job.chunk_bytes + (1 << 16)) if pool and fork else None
    _INPUTS = _Slots(_window(job) + 1, job.chunk_bytes + (1 << 20)) if pool and fork else None
    checker = pool or (ProcessPoolExecutor(1, mp_context=ctx, initializer=_die_with_parent) if prep.fallback else None)
    check = checker.submit(check_fast_path, prep.spec, job.sample, prep.info.fingerprint) if prep.fallback else None
    bar = Progress(sum(f.disk_bytes for g in groups for f in g.inputs), job.console, live=job.progress,
                   log=job.log)
    try:
        return list(_write(groups, prep.info, job, _encoder(pool, prep.info, job), lambda: _passed(check), bar))
    finally:
        bar.stop()
        for executor in {pool, checker} - {None}:
            executor.shutdown(wait=True, cancel_futures=True)
        for slots in (_SLOTS, _INPUTS):
            try:
                if slots is not None:
                    slots.mem.close()
            except BufferError:  # an error's traceback still holds a view of it: the collector unmaps it later
                pass
        _SLOTS = _INPUTS = None


def _window(job: Job) -> int:
    """Chunks in flight: enough that no worker waits while this process writes."""
    return 2 * job.workers + 1


class _Slots:
    """Shared memory between this process and its workers: where workers leave each chunk's ids for this process
    to write (``_SLOTS``), and where this process leaves a decompressed chunk's text for a worker (``_INPUTS``).
    The ids of a GB of text (about a GB) would otherwise be pickled, sent through a pipe 64 KiB at a time and
    unpickled here, which took more of this process's time than anything else it does; a .gz's text likewise on
    its way out. Chunk n uses slot n % count, and ``count`` is one more than the chunks in flight, so a slot is
    free again once the chunk that used it has been written. What does not fit (a chunk of one very long line)
    travels through the pipe as before.

    Memory: the slots' pages (about the chunks in flight) stay mapped here; a worker unmaps the slot it used, or
    every worker would map — and count in its RSS — every slot of the run."""

    def __init__(self, count: int, size: int):
        size = -(-size // mmap.PAGESIZE) * mmap.PAGESIZE
        self.count, self.size = count, size
        self.mem = mmap.mmap(-1, count * size)  # anonymous and shared: forked workers map the same pages

    def put(self, slot: int, ids: list[tuple[np.ndarray, np.ndarray]], dtype: np.dtype) -> list:
        """(a slot reference or, when it does not fit, the array itself; lengths) per key; ids converted to
        ``dtype`` on the way in."""
        if sum(len(t) for t, _ in ids) * dtype.itemsize > self.size:
            return [(t.astype(dtype), n) for t, n in ids]
        out, offset = [], slot * self.size
        for tokens, lengths in ids:
            np.copyto(np.frombuffer(self.mem, dtype, len(tokens), offset), tokens, casting="unsafe")
            out.append((_InSlot(offset, len(tokens), dtype.str), lengths))
            offset += len(tokens) * dtype.itemsize
        self._unmap(slot)
        return out

    def put_bytes(self, slot: int, data: bytes) -> bool:
        """``data`` into the slot, if it fits."""
        if len(data) > self.size:
            return False
        self.mem[slot * self.size:slot * self.size + len(data)] = data
        return True

    def take_bytes(self, slot: int, n: int) -> bytes:
        """(in a worker) the slot's first ``n`` bytes."""
        data = self.mem[slot * self.size:slot * self.size + n]
        self._unmap(slot)
        return data

    def _unmap(self, slot: int) -> None:
        try:
            self.mem.madvise(mmap.MADV_DONTNEED, slot * self.size, self.size)
        except (OSError, ValueError):  # not every kernel (or sandbox) has it: then the pages stay mapped
            pass

    def get(self, ids: list) -> list[tuple[np.ndarray, np.ndarray]]:
        return [(np.frombuffer(self.mem, np.dtype(t.dtype), t.count, t.offset) if isinstance(t, _InSlot) else t, n)
                for t, n in ids]


@dataclass
class _InSlot:  # ids a worker left in a _Slots slot
    offset: int
    count: int
    dtype: str


# --- worker side ---------------------------------------------------------------------------------------------------

_ENCODER: TextEncoder | None = None
_SLOTS: _Slots | None = None
_INPUTS: _Slots | None = None


def _die_with_parent() -> None:
    """A worker must not outlive a killed ``keizoku tokenize`` (it would wait for tasks forever)."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _init_worker(spec: EncoderSpec) -> None:
    global _ENCODER
    _die_with_parent()
    _ENCODER = encoder_for(spec)  # a forked worker inherits the parent's; a spawned one builds it


@dataclass
class Encoded:
    """A chunk tokenized: (ids, per-document lengths) per key, and what its parsing found."""

    ids: list[tuple[np.ndarray, np.ndarray]]
    text_bytes: int
    skipped: list[tuple[int | None, str]]  # (line within the chunk, reason) of each bad record skipped
    error: tuple[int | None, str] | None  # the first bad record, when not skipping (then ``ids`` is empty)
    lines: int  # records in the chunk


def encode_chunk(chunk: Chunk, keys: list[str], skip: bool, dtype: np.dtype, bos: int | None,
                 eod: int | None, slot: int | None = None, text_in_slot: int = 0) -> Encoded:
    """Parse one chunk's records and tokenize their texts (in a worker process, or here with one worker); a
    worker leaves the ids in result slot ``slot``, converting them to ``dtype`` on the way, and finds the chunk's
    first ``text_in_slot`` bytes of text in its input slot."""
    if text_in_slot:
        chunk = replace(chunk, data=_INPUTS.take_bytes(slot, text_in_slot))
    slots = _SLOTS if slot is not None else None
    as_made = np.dtype(np.uint32) if slots is not None else dtype  # the C encoders' own: no copy before the slot's
    lines = encode_json_lines(chunk, keys[0], skip, lambda data, key, slow: _ENCODER.encode_lines(
        data, key, as_made, bos, eod, slow)) if isinstance(chunk, Lines) and len(keys) == 1 else None
    if lines is not None:
        (tokens, lengths, _), skipped, error, count = lines
        ids, text_bytes = [] if error else [(tokens, lengths)], chunk.text_bytes
    else:
        parsed = parse_chunk(chunk, keys, skip)
        ids = [] if parsed.error else [_ENCODER.encode_pack(texts, as_made, bos, eod) for texts in parsed.texts]
        text_bytes, skipped, error, count = parsed.text_bytes, parsed.skipped, parsed.error, parsed.lines
    if slots is not None:
        ids = slots.put(slot, ids, dtype)
    return Encoded(ids, text_bytes, skipped, error, count)


# --- main side -----------------------------------------------------------------------------------------------------

def _encoder(pool: ProcessPoolExecutor | None, info: TokenizerInfo, job: Job) -> Callable[[Chunk], Future]:
    """A chunk -> the future of its ``Encoded``: from a worker, or computed here with one worker."""
    submitted = 0

    def encode(chunk: Chunk) -> Future:
        nonlocal submitted
        args = (chunk, job.keys, job.skip, info.dtype, job.bos, job.eod)
        if pool is not None:
            submitted += 1
            slot = submitted % _SLOTS.count if _SLOTS is not None else None
            if slot is not None and isinstance(chunk, Lines) and chunk.data and _INPUTS.put_bytes(slot, chunk.data):
                return pool.submit(encode_chunk, replace(chunk, data=b""), *args[1:], slot, len(chunk.data))
            return pool.submit(encode_chunk, *args, slot)
        done = Future()
        done.set_result(encode_chunk(*args))
        return done
    return encode


def _passed(check: Future | None) -> None:
    """Wait for the fast path's check, if one is running; raise if it failed."""
    if check is not None:
        ok, why = check.result()
        if not ok:
            raise FastPathRejected(why)


@dataclass
class _Start:  # a group's first read: its seconds count from here
    group: DatasetGroup
    time: float


@dataclass
class _Chunk:  # a chunk read here; a worker parses and tokenizes it
    file: InputFile
    chunk: Chunk
    disk_bytes: int  # of the file, read since its previous chunk
    encoded: Future | None = None


@dataclass
class _InputRead:  # an input file read to its end
    record: dict


@dataclass
class _End:  # a group's last input read
    pass


def _read(groups: list[DatasetGroup], job: Job) -> Iterator[_Start | _Chunk | _InputRead | _End]:
    """Every group's inputs as chunks between the group's start and end, in input order."""
    for g in groups:
        yield _Start(g, time.perf_counter())
        for f in g.inputs:
            reader, pos = open_input(f, job.keys, job.chunk_bytes), 0  # a whole file, or a share's byte range
            for chunk in reader:
                yield _Chunk(f, chunk, chunk.disk_pos - pos)
                pos = chunk.disk_pos
            yield _InputRead(reader.record())
        yield _End()


def _in_order(events: Iterator, encode: Callable[[Chunk], Future], window: int) -> Iterator:
    """The events in their order, each ``_Chunk`` with its ids under way (``encode``) when it is read, at most
    ``window`` chunks ahead of the one handed out."""
    queue: deque = deque()
    in_flight = 0
    for ev in events:
        if isinstance(ev, _Chunk):
            ev.encoded = encode(ev.chunk)
            in_flight += 1
        queue.append(ev)
        while queue and (in_flight > window or not isinstance(queue[0], _Chunk)):
            ev = queue.popleft()
            in_flight -= isinstance(ev, _Chunk)
            yield ev
    yield from queue


def _write(groups: list[DatasetGroup], info: TokenizerInfo, job: Job, encode: Callable[[Chunk], Future],
           before_publish: Callable[[], None], bar: Progress) -> Iterator[DatasetResult]:
    """Write every chunk's ids in order and publish each group at its end; abort the open one on any error."""
    dataset = None
    try:
        for ev in _in_order(_read(groups, job), encode, _window(job)):
            if isinstance(ev, _Start):
                dataset = _Dataset(ev.group, info.dtype, ev.time)
            elif isinstance(ev, _Chunk):
                encoded = ev.encoded.result()
                if _SLOTS is not None:
                    encoded.ids = _SLOTS.get(encoded.ids)
                dataset.write(ev.file.where, encoded)  # the path, or a share's: lines count from its start
                bar.update(ev.file.name, ev.disk_bytes, docs=len(encoded.ids[0][1]),
                           tokens=sum(len(t) for t, _ in encoded.ids), text_bytes=encoded.text_bytes)
            elif isinstance(ev, _InputRead):
                dataset.inputs.append(ev.record)
            else:
                before_publish()
                yield from dataset.publish(info, job)
                dataset = None
    except BaseException:
        if dataset is not None:
            dataset.abort()
        raise


class _Dataset:
    """A group being written: a writer per key, its inputs as the manifest records them, what was skipped."""

    def __init__(self, group: DatasetGroup, dtype: np.dtype, start: float):
        self.group, self.start = group, start
        self.writers = {k: IndexedDatasetWriter(p, dtype) for k, p in group.prefixes.items()}
        self.inputs: list[dict] = []
        self.skipped = Skipped()
        self.input_bytes = 0
        self._path, self._lines = None, 0  # the file being written, and its lines written so far

    def write(self, path: Path, encoded: Encoded) -> None:
        if path != self._path:
            self._path, self._lines = path, 0

        def in_file(line: int | None, reason: str) -> tuple[int | None, str]:
            """(line of the file, reason) for a record numbered within its chunk; None: the stream's damage."""
            if line is None:
                return None, f"{reason}; data after line {self._lines + encoded.lines} lost"
            return self._lines + line, reason

        for line, reason in encoded.skipped:
            self.skipped.add(path, *in_file(line, reason))
        if encoded.error is not None:
            line, reason = in_file(*encoded.error)
            raise TokenizeError(f"{path}: {reason}" if line is None else f"{path}:{line}: {reason}")
        self._lines += encoded.lines
        for writer, (tokens, lengths) in zip(self.writers.values(), encoded.ids):
            writer.add_chunk(tokens, lengths)
        self.input_bytes += encoded.text_bytes

    def publish(self, info: TokenizerInfo, job: Job) -> list[DatasetResult]:
        """Rename every key's dataset into place, then enter them all in the manifest."""
        seconds = time.perf_counter() - self.start
        entries = {}
        for key, w in self.writers.items():
            w.finalize()
            entries[entry_name(job.manifest_path, w.prefix)] = dataset_entry(
                key, w, inputs=self.inputs, input_bytes=self.input_bytes, skipped=self.skipped,
                tokenizer=info.to_json(), flags=job.flags, seconds=seconds)
        update_manifest(job.manifest_path, entries)
        return [DatasetResult(self.group.name, k, w.prefix, w.documents, w.tokens, self.input_bytes, seconds,
                              self.skipped.count) for k, w in self.writers.items()]

    def abort(self) -> None:
        for w in self.writers.values():
            w.abort()
