"""The tokenize pipeline: output groups in, published datasets out, with worker processes tokenizing.

This process reads each group's inputs chunk by chunk (``readers``), parses them (``records``) and hands each
chunk's texts to a worker (``encode_texts``); the ids come back as futures and are written strictly in input
order (``_in_order``), at most ``2 × workers + 1`` chunks ahead, reading on across file and group boundaries so
that the workers never wait for a group to be published. A group's datasets are published when its last chunk
is written: ``.bin``/``.idx`` renamed into place (``IndexedDatasetWriter.finalize``), then the manifest entry.
Bad input stops the run at the first bad record, in input order (``TokenizeError``), unless skipped.

While the exact fast BPE path is not yet verified (``Prepared.fallback``), a worker — or a side process, with
one worker — checks it against Hugging Face while the others tokenize, and nothing is published before the
check has passed; if it fails (``FastPathRejected``) the caller starts again with Hugging Face's encoder.
"""

from __future__ import annotations

import multiprocessing
import signal
import sys
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from keizoku.data.indexed import IndexedDatasetWriter
from keizoku.data.inputs import InputFile
from keizoku.data.manifest import Skipped, dataset_entry, entry_name, input_record, update_manifest
from keizoku.data.progress import Progress
from keizoku.data.readers import open_reader
from keizoku.data.records import ParsedChunk, parse_chunk
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
    global _ENCODER
    _ENCODER = encoder_for(prep.spec)  # forked workers inherit it; spawned ones build it in _init_worker
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    # one worker: tokenize here, no inter-process traffic at all
    pool = ProcessPoolExecutor(job.workers, mp_context=ctx, initializer=_init_worker, initargs=(prep.spec,)) \
        if job.workers > 1 else None
    checker = pool or (ProcessPoolExecutor(1, mp_context=ctx, initializer=_die_with_parent) if prep.fallback else None)
    check = checker.submit(check_fast_path, prep.spec, job.sample, prep.info.fingerprint) if prep.fallback else None
    bar = Progress(sum(f.path.stat().st_size for g in groups for f in g.inputs), job.console, live=job.progress,
                   log=job.log)
    try:
        return list(_write(groups, prep.info, job, _encoder(pool, prep.info, job), lambda: _passed(check), bar))
    finally:
        bar.stop()
        for executor in {pool, checker} - {None}:
            executor.shutdown(wait=True, cancel_futures=True)


# --- worker side ---------------------------------------------------------------------------------------------------

_ENCODER: TextEncoder | None = None


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


def encode_texts(texts: list[list[str]], dtype: np.dtype, bos: int | None,
                 eod: int | None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Tokenize one chunk's texts (in a worker process): (ids, per-document lengths) per key."""
    return [_ENCODER.encode_pack(key_texts, dtype, bos, eod) for key_texts in texts]


# --- main side -----------------------------------------------------------------------------------------------------

def _encoder(pool: ProcessPoolExecutor | None, info: TokenizerInfo, job: Job) -> Callable[[ParsedChunk], Future]:
    """A chunk's texts -> the future of their ids: from a worker, or computed here with one worker."""
    def encode(parsed: ParsedChunk) -> Future:
        if pool is not None:
            return pool.submit(encode_texts, parsed.texts, info.dtype, job.bos, job.eod)
        done = Future()
        done.set_result(encode_texts(parsed.texts, info.dtype, job.bos, job.eod))
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
class _Chunk:  # a chunk, parsed here; its ids come from a worker
    file: InputFile
    parsed: ParsedChunk
    disk_bytes: int  # of the file, read since its previous chunk
    ids: Future | None = None


@dataclass
class _InputRead:  # an input file read to its end
    record: dict


@dataclass
class _End:  # a group's last input read
    pass


def _read(groups: list[DatasetGroup], job: Job) -> Iterator[_Start | _Chunk | _InputRead | _End]:
    """Every group's inputs as parsed chunks between the group's start and end, in input order."""
    for g in groups:
        yield _Start(g, time.perf_counter())
        for f in g.inputs:
            record = input_record(f.path)
            reader, pos = open_reader(f.path, job.keys, job.chunk_bytes), 0
            for chunk in reader:
                yield _Chunk(f, parse_chunk(chunk, job.keys, job.skip), chunk.disk_pos - pos)
                pos = chunk.disk_pos
            yield _InputRead({**record, "sha256": reader.sha256})
        yield _End()


def _in_order(events: Iterator, encode: Callable[[ParsedChunk], Future], window: int) -> Iterator:
    """The events in their order, each ``_Chunk`` with its ids under way (``encode``) when it is read, at most
    ``window`` chunks ahead of the one handed out."""
    queue: deque = deque()
    in_flight = 0
    for ev in events:
        if isinstance(ev, _Chunk):
            ev.ids = encode(ev.parsed)
            in_flight += 1
        queue.append(ev)
        while queue and (in_flight > window or not isinstance(queue[0], _Chunk)):
            ev = queue.popleft()
            in_flight -= isinstance(ev, _Chunk)
            yield ev
    yield from queue


def _write(groups: list[DatasetGroup], info: TokenizerInfo, job: Job, encode: Callable[[ParsedChunk], Future],
           before_publish: Callable[[], None], bar: Progress) -> Iterator[DatasetResult]:
    """Write every chunk's ids in order and publish each group at its end; abort the open one on any error."""
    dataset = None
    try:
        for ev in _in_order(_read(groups, job), encode, 2 * job.workers + 1):
            if isinstance(ev, _Start):
                dataset = _Dataset(ev.group, info.dtype, ev.time)
            elif isinstance(ev, _Chunk):
                ids = ev.ids.result()
                dataset.write(ev.file.path, ev.parsed, ids)
                bar.update(ev.file.name, ev.disk_bytes, docs=len(ids[0][1]), tokens=sum(len(t) for t, _ in ids),
                           text_bytes=ev.parsed.text_bytes)
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

    def write(self, path: Path, parsed: ParsedChunk, ids: list[tuple[np.ndarray, np.ndarray]]) -> None:
        for line, reason in parsed.skipped:
            self.skipped.add(path, line, reason)
        if parsed.error is not None:
            line, reason = parsed.error
            raise TokenizeError(f"{path}: {reason}" if line is None else f"{path}:{line}: {reason}")
        for writer, (tokens, lengths) in zip(self.writers.values(), ids):
            writer.add_chunk(tokens, lengths)
        self.input_bytes += parsed.text_bytes

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
