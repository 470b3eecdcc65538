"""``keizoku tokenize``: JSONL/Parquet documents → Megatron indexed datasets (``.bin``/``.idx``).

Pipeline: the main process reads inputs in chunks of whole lines (``readers``) and parses the JSON,
worker processes tokenize each chunk's texts and return one numpy array of ids plus per-document
lengths, and the main process appends those to the dataset files in input order (``indexed``). With
one worker, tokenizing happens in the main process. Per-document token lists never cross a process
boundary (the bottleneck of Megatron-LM's ``preprocess_data.py``), so throughput scales with workers;
results are consumed in submission order, so the output is the same for any number of workers. At
most ``2 × workers + 1`` chunks are in flight: memory does not grow with the input size.

Document rule (Megatron's): ids = [BOS if --add-bos] + tokenize(text); if ids is non-empty and
--append-eod, EOD (the tokenizer's eos) is appended. An empty document therefore gets no EOD and is
stored as a document with no tokens.
"""

from __future__ import annotations

import gc
import json
import math
import multiprocessing
import os
import signal
import sys
import time
from collections import Counter, deque
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import numpy as np
import orjson

from keizoku import __version__
from keizoku.data import manifest as mf
from keizoku.data.indexed import IndexedDatasetWriter, dataset_paths
from keizoku.data.readers import Chunk, InputError, InputFile, JsonlReader, ParquetReader, discover
from keizoku.data.tokenizer import EncoderSpec, TextEncoder, TokenizerInfo, check_fast_path, encoder_for, prepare

MAX_SKIP_EXAMPLES = 100


@dataclass
class TokenizeOptions:
    inputs: list[str]
    tokenizer: str
    output_dir: Path | None = None
    output_prefix: str | None = None
    text_keys: list[str] = field(default_factory=lambda: ["text"])
    append_eod: bool = True
    add_bos: bool = False
    use_fast: bool = True
    fast_bpe: bool = True
    workers: int = 0  # 0 = all cores
    on_error: str = "stop"  # or "skip"
    force: bool = False
    chunk_bytes: int = 4 << 20


class TokenizeError(Exception):
    """A run stopped on bad input; the message is ``path:line: what was wrong``."""


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
class RunResult:
    datasets: list[DatasetResult]
    tokenizer: TokenizerInfo | None
    seconds: float
    manifest: Path


# ---------------------------------------------------------------- worker side

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


def _describe(value) -> str:
    return {dict: "an object", list: "an array", bool: "a boolean", int: "a number", float: "a number"}.get(
        type(value), type(value).__name__)


def _parse_line(line: bytes, keys: list[str]) -> tuple[tuple[str, ...] | None, str | None]:
    """(texts, None) or (None, reason)."""
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError as e:
        if not line.strip():
            return None, "blank line"
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as u:
            return None, f"invalid UTF-8: byte 0x{line[u.start]:02x} at offset {u.start} of the line"
        try:  # what Megatron's json.loads accepts (NaN, huge integers) is not an error here either
            obj = json.loads(line)
        except ValueError as e2:
            return None, f"malformed JSON: {e2}" if str(e2) else f"malformed JSON: {e}"
        texts, reason = _texts(obj, keys)
        if reason is None:  # orjson only yields valid str; json can yield lone surrogates (\ud800 escapes)
            reason = _check_text(texts, keys)
        return (None, reason) if reason else (texts, None)
    return _texts(obj, keys)


def _texts(obj, keys: list[str]) -> tuple[tuple[str, ...] | None, str | None]:
    if not isinstance(obj, dict):
        return None, f"not a JSON object: found {_describe(obj)}"
    missing = next((k for k in keys if k not in obj), None)
    if missing is not None:
        return None, f"missing field: {missing!r} (expected a string)"
    return _strings([obj[k] for k in keys], keys, "")


def _strings(values: list, keys: list[str], what: str) -> tuple[tuple[str, ...] | None, str | None]:
    for key, value in zip(keys, values):
        if value is None:
            return None, f"null field: {what}{key!r} is null (expected a string)"
        if not isinstance(value, str):
            return None, f"not a string: {what}{key!r} is {_describe(value)} (expected a string)"
    return tuple(values), None


def _check_text(texts: tuple[str, ...], keys: list[str]) -> str | None:
    for key, text in zip(keys, texts):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            return f"unpaired surrogate: {key!r} contains \\u{ord(text[e.start]):04x}"
    return None


def _collect(numbered, skip: bool):
    """(line, texts, reason) items -> rows, skipped (line, reason), first error (line, reason) unless skip."""
    rows, skipped = [], []
    for line, texts, reason in numbered:
        if reason is None:
            rows.append(texts)
        elif skip:
            skipped.append((line, reason))
        else:
            return rows, skipped, (line, reason)
    return rows, skipped, None


def _parse_jsonl(data: bytes, first_line: int, keys: list[str], skip: bool):
    lines = data.split(b"\n")
    if lines and not lines[-1]:
        lines.pop()
    return _collect(((first_line + i, *_parse_line(line, keys)) for i, line in enumerate(lines)), skip)


def _parse_batch(batch, first_row: int, keys: list[str], skip: bool):
    columns = [batch.column(batch.schema.get_field_index(key)).to_pylist() for key in keys]
    return _collect(((first_row + i, *_strings(list(values), keys, "column ")) for i, values in enumerate(zip(*columns))),
                    skip)


@dataclass
class ParsedChunk:
    """A chunk after parsing (in the main process): the texts per key, what was skipped, the first error."""

    texts: list[list[str]]  # one list per key
    text_bytes: int
    skipped: list[tuple[int, str]]
    error: tuple[int, str] | None


def parse_chunk(chunk: Chunk, keys: list[str], skip: bool) -> ParsedChunk:
    if chunk.batch is not None:
        rows, skipped, error = _parse_batch(chunk.batch, chunk.first_line, keys, skip)
        text_bytes = chunk.batch.nbytes
    else:
        rows, skipped, error = _parse_jsonl(chunk.data, chunk.first_line, keys, skip)
        text_bytes = len(chunk.data)
    return ParsedChunk([[r[k] for r in rows] for k in range(len(keys))], text_bytes, skipped, error)


def encode_texts(texts: list[list[str]], dtype: np.dtype, bos: int | None,
                 eod: int | None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Tokenize one chunk's texts (in a worker process): (ids, per-document lengths) per key."""
    return [_ENCODER.encode_pack(key_texts, dtype, bos, eod) for key_texts in texts]


# ---------------------------------------------------------------- main side


def plan(opts: TokenizeOptions, inputs: list[InputFile]) -> tuple[list[DatasetGroup], Path]:
    keys = opts.text_keys
    if (opts.output_dir is None) == (opts.output_prefix is None):
        raise InputError("give exactly one of --output-dir and --output-prefix")
    if opts.output_prefix is not None:
        prefix = Path(opts.output_prefix).absolute()
        group = DatasetGroup(name=prefix.name, inputs=inputs,
                             prefixes={k: f"{prefix}_{k}_document" for k in keys})
        return [group], prefix.parent / mf.MANIFEST_NAME
    out = Path(opts.output_dir).absolute()
    groups, owner = [], {}
    for f in inputs:
        if f.name in owner:
            raise InputError(f"{f.path} and {owner[f.name]} would both write {out / f.name}_*; "
                             "rename one, or tokenize them in separate runs")
        owner[f.name] = f.path
        groups.append(DatasetGroup(name=f.name, inputs=[f], prefixes={k: f"{out / f.name}_{k}_document" for k in keys}))
    return groups, out / mf.MANIFEST_NAME


def _flags(opts: TokenizeOptions) -> dict:
    return {"append_eod": opts.append_eod, "add_bos": opts.add_bos, "use_fast": opts.use_fast,
            "on_error": opts.on_error, "text_key_order": list(opts.text_keys)}


def _input_record(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path.absolute()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _entry_up_to_date(entry: dict, group: DatasetGroup, prefix: str, tok: TokenizerInfo, flags: dict) -> bool:
    from keizoku.data.readers import file_sha256

    if entry.get("tokenizer", {}).get("fingerprint") != tok.fingerprint or entry.get("flags") != flags:
        return False
    recorded = entry.get("inputs", [])
    if len(recorded) != len(group.inputs):
        return False
    for rec, f in zip(recorded, group.inputs):
        now = _input_record(f.path)
        if rec.get("path") != now["path"] or rec.get("size") != now["size"]:
            return False
        if rec.get("mtime_ns") != now["mtime_ns"] and rec.get("sha256") != file_sha256(f.path):
            return False
    bin_path, idx_path = dataset_paths(prefix)
    return (bin_path.exists() and idx_path.exists() and bin_path.stat().st_size == entry.get("bin_bytes")
            and idx_path.stat().st_size == entry.get("idx_bytes"))


def _sample_texts(inputs: list[InputFile], keys: list[str], limit: int = 256 << 10) -> list[str]:
    """Texts from the start of the first input, to verify the fast BPE path on real data."""
    if not inputs:
        return []
    f = inputs[0]
    try:
        if f.is_parquet:
            chunk = next(iter(ParquetReader(f.path, keys, rows_per_chunk=64)), None)
            rows, _, _ = _parse_batch(chunk.batch, 1, keys, True) if chunk else ([], [], None)
        else:
            chunk = next(iter(JsonlReader(f.path, chunk_bytes=limit)), None)
            rows, _, _ = _parse_jsonl(chunk.data, 1, keys, True) if chunk and chunk.data else ([], [], None)
    except (InputError, OSError):
        return []
    return [t for r in rows for t in r]


class _Progress:
    """Progress over input bytes on disk, with docs/s, MB/s (bytes read) and tokens/s.

    A live bar on a terminal; in a batch job's log, a plain line every ``log_every`` seconds.
    """

    def __init__(self, total_bytes: int, console, live: bool, log=None, log_every: float = 30.0):
        self.enabled = live
        self.total = max(total_bytes, 1)
        self.done = 0
        self.docs = self.tokens = self.text_bytes = 0
        self.start = self._last_log = time.perf_counter()
        self._log, self._log_every = log, log_every
        if not live:
            return
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        self._p = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.percentage:>5.1f}%"),
            TextColumn("{task.fields[rates]}"), TimeRemainingColumn(), console=console, transient=False,
        )
        self._task = self._p.add_task("tokenize", total=max(total_bytes, 1), rates="")
        self._p.start()

    def update(self, name: str, disk_bytes: int, docs: int, tokens: int, text_bytes: int) -> None:
        self.docs += docs
        self.tokens += tokens
        self.text_bytes += text_bytes
        self.done += disk_bytes
        now = time.perf_counter()
        dt = max(now - self.start, 1e-9)
        rates = (f"{self.docs / dt:,.0f} docs/s  {self.text_bytes / dt / 1e6:,.2f} MB/s  "
                 f"{self.tokens / dt / 1e6:,.2f}M tok/s")
        if self.enabled:
            self._p.update(self._task, advance=disk_bytes, description=name[-40:], rates=rates)
        elif self._log is not None and now - self._last_log >= self._log_every:
            self._last_log = now
            frac = self.done / self.total
            eta = dt * (1 - frac) / frac if frac > 0 else float("nan")
            self._log(f"{100 * frac:5.1f}%  {self.docs:,} docs  {self.tokens:,} tokens  {rates}  "
                      f"ETA {eta:,.0f} s  ({name})")

    def stop(self) -> None:
        if self.enabled:
            self._p.stop()


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def run(opts: TokenizeOptions, console=None, progress: bool = True, log=print) -> RunResult:
    """Tokenize ``opts.inputs``; ``progress`` shows a live bar (else ``log`` gets a line every 30 s)."""
    t0 = time.perf_counter()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one thread per worker process
    if opts.on_error not in ("stop", "skip"):
        raise InputError(f"--on-error must be 'stop' or 'skip', not {opts.on_error!r}")
    if not opts.text_keys:
        raise InputError("give at least one --text-key")
    inputs = discover(opts.inputs)
    groups, manifest_path = plan(opts, inputs)
    manifest = mf.load(manifest_path)
    manifest_dir = manifest_path.parent

    sample = _sample_texts(inputs, opts.text_keys)
    prep = prepare(opts.tokenizer, use_fast=opts.use_fast, fast_bpe=opts.fast_bpe, sample_texts=sample,
                   defer_check=True)
    info = prep.info
    log(f"tokenizer {info.name_or_path}: {info.class_name}, vocab {info.vocab_size:,}, dtype {info.dtype}; "
        f"ids by {info.engine}" + (f" ({info.fast_path_note})" if info.fast_path_note else ""))
    eod = bos = None
    if opts.append_eod:
        if info.eos_id is None:
            raise InputError(f"{opts.tokenizer}: tokenizer has no eos token to use as EOD; pass --no-append-eod")
        eod = info.eos_id
    if opts.add_bos:
        if info.bos_id is None:
            raise InputError(f"{opts.tokenizer}: tokenizer has no bos token; drop --add-bos")
        bos = info.bos_id

    flags = _flags(opts)
    results: list[DatasetResult] = []
    pending: list[DatasetGroup] = []
    for g in groups:
        entries = {k: manifest["datasets"].get(os.path.relpath(p, manifest_dir)) for k, p in g.prefixes.items()}
        if not opts.force and all(e is not None and _entry_up_to_date(e, g, g.prefixes[k], info, flags)
                                  for k, e in entries.items()):
            for k, e in entries.items():
                results.append(DatasetResult(g.name, k, g.prefixes[k], e["documents"], e["tokens"],
                                             e["input_bytes"], e["seconds"], e["skipped"]["count"], True))
        else:
            pending.append(g)
    if len(pending) < len(groups):
        log(f"{len(groups) - len(pending)} of {len(groups)} datasets are complete and up to date; "
            "skipping them (--force redoes them)")

    if pending:
        gc.freeze()  # the tokenizer's large tables: keep the collector from walking them again and again
        job = dict(opts=opts, dtype=info.dtype, bos=bos, eod=eod, workers=opts.workers or default_workers(),
                   manifest=manifest, manifest_path=manifest_path, flags=flags, console=console,
                   progress=progress, log=log, sample=sample)
        try:
            results += _tokenize_groups(pending, prep, **job)
        except _FastPathRejected as e:
            prep = prep.rejected(str(e))
            info = prep.info
            log(f"tokenizer: {info.fast_path_note}; starting again")
            results += _tokenize_groups(pending, prep, **job)
    order = {(g.name, k): i for i, g in enumerate(groups) for k in opts.text_keys}
    results.sort(key=lambda r: order[(r.name, r.key)])
    return RunResult(results, info, time.perf_counter() - t0, manifest_path)


class _FastPathRejected(Exception):
    """The deferred check found that the fast BPE path would not give Hugging Face's ids."""


def _tokenize_groups(groups, prep, *, opts, dtype, bos, eod, workers, manifest, manifest_path, flags,
                     console, progress, log, sample) -> list[DatasetResult]:
    """Tokenize with N worker processes; this process reads, parses JSON and writes (as
    preprocess_data.py's main process reads and writes around its N workers)."""
    global _ENCODER
    _ENCODER = encoder_for(prep.spec)  # forked workers inherit it; spawned ones build it in _init_worker
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    # one worker: tokenize here, no inter-process traffic at all
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(prep.spec,)) \
        if workers > 1 else None
    # an unverified fast path is checked in another process while tokenizing starts; nothing is
    # published (renamed into place, entered in the manifest) before the check has passed
    checker = pool or (ProcessPoolExecutor(1, mp_context=ctx, initializer=_die_with_parent) if prep.fallback else None)
    check = checker.submit(check_fast_path, prep.spec, sample, prep.info.fingerprint) if prep.fallback else None

    def before_publish() -> None:
        if check is not None:
            ok, why = check.result()
            if not ok:
                raise _FastPathRejected(why)

    bar = _Progress(sum(f.path.stat().st_size for g in groups for f in g.inputs), console, live=progress, log=log)
    try:
        return list(_process(groups, opts, prep.info, dtype=dtype, bos=bos, eod=eod, pool=pool, workers=workers,
                             manifest=manifest, manifest_path=manifest_path, flags=flags, bar=bar,
                             before_publish=before_publish))
    finally:
        bar.stop()
        for executor in {pool, checker} - {None}:
            executor.shutdown(wait=True, cancel_futures=True)


@dataclass
class _GroupState:
    group: DatasetGroup
    writers: dict[str, IndexedDatasetWriter]
    start: float
    inputs: list[dict] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    examples: list[dict] = field(default_factory=list)
    skipped_count: int = 0
    input_bytes: int = 0


def _events(groups: list[DatasetGroup], opts: TokenizeOptions) -> Iterator[tuple]:
    """("chunk", gi, file, chunk) … ("input_done", gi, record) … ("group_done", gi), in input order."""
    for gi, g in enumerate(groups):
        yield ("group_start", gi, time.perf_counter())  # a dataset's seconds count from its first read
        for f in g.inputs:
            record = _input_record(f.path)
            reader = ParquetReader(f.path, opts.text_keys) if f.is_parquet else JsonlReader(f.path, opts.chunk_bytes)
            for chunk in reader:
                yield ("chunk", gi, f, chunk)
            record["sha256"] = reader.sha256
            yield ("input_done", gi, record)
        yield ("group_done", gi)


def _process(groups, opts, info, *, dtype, bos, eod, pool, workers, manifest, manifest_path, flags, bar,
             before_publish):
    skip = opts.on_error == "skip"
    keys = opts.text_keys
    states: dict[int, _GroupState] = {}
    # (event, parsed chunk, future of its ids) in input order; handled strictly from the left
    queue: deque[tuple[tuple, ParsedChunk | None, Future | None]] = deque()
    window = 2 * workers + 1
    in_flight = 0
    last_pos: dict[Path, int] = {}

    def handle(ev, parsed, future):
        kind, gi = ev[0], ev[1]
        if kind == "group_start":
            g = groups[gi]
            states[gi] = _GroupState(g, {k: IndexedDatasetWriter(p, dtype) for k, p in g.prefixes.items()}, ev[2])
            return None
        st = states[gi]
        if kind == "chunk":
            f, chunk = ev[2], ev[3]
            for line, reason in parsed.skipped:
                _note_skip(st, f.path, line, reason)
            if parsed.error is not None:
                raise TokenizeError(f"{f.path}:{parsed.error[0]}: {parsed.error[1]}")
            if chunk.truncated:
                if not skip:
                    raise TokenizeError(f"{f.path}: {chunk.truncated}")
                _note_skip(st, f.path, None, chunk.truncated)
            encoded = future.result()
            for k, (tokens, lengths) in zip(keys, encoded):
                st.writers[k].add_chunk(tokens, lengths)
            st.input_bytes += parsed.text_bytes
            prev = last_pos.get(f.path, 0)
            last_pos[f.path] = chunk.disk_pos
            bar.update(f.name, chunk.disk_pos - prev, len(encoded[0][1]), sum(len(t) for t, _ in encoded),
                       parsed.text_bytes)
            return None
        if kind == "input_done":
            st.inputs.append(ev[2])
            return None
        # group_done: finalize files, then record them
        before_publish()
        out, new_entries = [], []
        seconds = time.perf_counter() - st.start
        for k, w in st.writers.items():
            w.finalize()
            rel = os.path.relpath(w.prefix, manifest_path.parent)
            new_entries.append(rel)
            bin_path, idx_path = dataset_paths(w.prefix)
            manifest["datasets"][rel] = {
                "key": k,
                "inputs": st.inputs,
                "documents": w.documents,
                "empty_documents": w.empty_documents,
                "tokens": w.tokens,
                "dtype": str(dtype),
                "bin_bytes": bin_path.stat().st_size,
                "idx_bytes": idx_path.stat().st_size,
                "input_bytes": st.input_bytes,
                "skipped": {"count": st.skipped_count, "by_reason": dict(st.skipped), "examples": st.examples},
                "tokenizer": info.to_json(),
                "flags": flags,
                "keizoku_version": __version__,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "seconds": round(seconds, 3),
                "tokens_per_second": round(w.tokens / seconds, 1) if seconds > 0 else None,
            }
            out.append(DatasetResult(st.group.name, k, w.prefix, w.documents, w.tokens, st.input_bytes,
                                     seconds, st.skipped_count))
        mf.update(manifest_path, {e: manifest["datasets"][e] for e in new_entries})
        del states[gi]
        return out

    def drain_one():
        nonlocal in_flight
        ev, parsed, future = queue.popleft()
        if future is not None:
            in_flight -= 1
        return handle(ev, parsed, future)

    try:
        for ev in _events(groups, opts):
            parsed = future = None
            if ev[0] == "chunk":
                # parse here (cheap, and errors keep their order); tokenize in a worker
                parsed = parse_chunk(ev[3], keys, skip)
                chunk_texts = [] if parsed.error else parsed.texts
                if pool is not None:
                    future = pool.submit(encode_texts, chunk_texts, dtype, bos, eod)
                else:
                    future = Future()
                    future.set_result(encode_texts(chunk_texts, dtype, bos, eod))
                in_flight += 1
                ev = (*ev[:3], ev[3].without_payload())
            queue.append((ev, parsed, future))
            while queue and (in_flight > window or queue[0][2] is None):
                done = drain_one()
                if done:
                    yield from done
        while queue:
            done = drain_one()
            if done:
                yield from done
    except BaseException:
        for st in states.values():
            for w in st.writers.values():
                w.abort()
        for _, _, future in queue:
            if future is not None:
                future.cancel()
        raise


def _note_skip(st: _GroupState, path: Path, line: int | None, reason: str) -> None:
    st.skipped[reason.split(":")[0]] += 1  # reasons read "category: detail"
    st.skipped_count += 1
    if len(st.examples) < MAX_SKIP_EXAMPLES:
        st.examples.append({"path": str(path), "line": line, "reason": reason})


def summarize(result: RunResult) -> list[dict]:
    rows = []
    for r in result.datasets:
        rows.append({
            "dataset": r.name + ("" if len({d.key for d in result.datasets}) == 1 else f" [{r.key}]"),
            "documents": r.documents, "tokens": r.tokens, "mb": r.input_bytes / 1e6, "seconds": r.seconds,
            "tokens_per_s": r.tokens / r.seconds if r.seconds > 0 else math.nan,
            "skipped": r.skipped, "status": "up to date" if r.up_to_date else "done",
        })
    return rows
