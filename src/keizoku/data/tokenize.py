"""``keizoku tokenize``: JSONL/Parquet documents → Megatron indexed datasets (``.bin``/``.idx``).

Pipeline: the main process reads inputs in chunks (``readers``) and parses them (``records``), worker
processes tokenize each chunk's texts and return one numpy array of ids plus per-document lengths, and the
main process appends those to the dataset files in input order (``indexed``). With one worker, tokenizing
happens in the main process. Per-document token lists never cross a process boundary (the bottleneck of
Megatron-LM's ``preprocess_data.py``), so throughput scales with workers; results are consumed in submission
order, so the output is the same for any number of workers. At most ``2 × workers + 1`` chunks are in
flight: memory does not grow with the input size.

Document rule (Megatron's): ids = [BOS if --add-bos] + tokenize(text); if ids is non-empty and
--append-eod, EOD (the tokenizer's eos) is appended. An empty document therefore gets no EOD and is
stored as a document with no tokens.

Output groups (``output_groups``): with ``--output-dir`` each input file is a group of its own, with
``--output-prefix`` all inputs, in order, are one; a group is one dataset per key. A group is published —
its ``.bin``/``.idx`` renamed into place, then its manifest entry written (``manifest``) — once all its
inputs are read; a rerun skips the groups whose entries are current, so an interrupted run resumes.

``--shard K/N`` (``shards``): the run tokenizes only share K of the plan of N shares, as a run over those pieces
would, into ``PARTS/shard-K-of-N/`` (``_share``); ``merge`` joins the shares into the output a run over every
input writes. A share whose pieces' merged datasets are current already has nothing to do.
"""

from __future__ import annotations

import gc
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from keizoku.data import shards
from keizoku.data.inputs import InputFile, discover
from keizoku.data.manifest import MANIFEST_NAME, entry_is_current, entry_name, read_manifest, update_manifest
from keizoku.data.pipeline import DatasetGroup, DatasetResult, FastPathRejected, Job, TokenizeError, write_datasets
from keizoku.data.readers import DEFAULT_CHUNK_BYTES, InputError, open_reader
from keizoku.data.records import parse_chunk
from keizoku.data.tokenizer import TokenizerInfo, prepare

__all__ = ["DatasetGroup", "DatasetResult", "TokenizeError", "TokenizeOptions", "TokenizeResult", "default_workers",
           "flags", "output_groups", "summarize", "tokenize"]


@dataclass
class TokenizeOptions:
    """What to tokenize, and how: ``keizoku tokenize``'s options."""

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
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    shard: tuple[int, int] | None = None  # (K, N): only share K of N (shards), into PARTS/shard-K-of-N


@dataclass
class TokenizeResult:
    """Every dataset of the run, made now or found up to date, in input and key order."""

    datasets: list[DatasetResult]
    tokenizer: TokenizerInfo | None
    seconds: float
    manifest: Path


def tokenize(opts: TokenizeOptions, console=None, progress: bool = True, log=print) -> TokenizeResult:
    """Tokenize ``opts.inputs``; ``progress`` shows a live bar (else ``log`` gets a line every 30 s)."""
    t0 = time.perf_counter()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one thread per worker process
    _check_options(opts)
    inputs = discover(opts.inputs)
    if opts.shard is not None:
        groups, manifest_path, share_record = _share(opts, inputs, log)
        if not groups:
            return TokenizeResult([], None, time.perf_counter() - t0, manifest_path)
    else:
        groups, manifest_path = output_groups(opts, inputs)
    manifest = read_manifest(manifest_path)
    sample = _sample_texts(inputs, opts.text_keys)  # a share checks the fast path on what a whole run would
    prep = prepare(opts.tokenizer, use_fast=opts.use_fast, fast_bpe=opts.fast_bpe, sample_texts=sample,
                   defer_check=True)
    log(_tokenizer_line(prep.info))
    bos, eod = _special_ids(opts, prep.info)
    if opts.shard is not None:  # what merge reads of this share's last run
        update_manifest(manifest_path, {}, fields={"shard": {**share_record, "tokenizer": prep.info.fingerprint}})
        groups = _not_merged_yet(opts, inputs, groups, prep.info.fingerprint, log)
    results, pending = _up_to_date(groups, manifest, manifest_path, prep.info.fingerprint, flags(opts), opts.force)
    if len(pending) < len(groups):
        log(f"{len(groups) - len(pending)} of {len(groups)} datasets are complete and up to date; "
            "skipping them (--force redoes them)")
    if pending:
        gc.freeze()  # the tokenizer's large tables: keep the collector from walking them again and again
        job = Job(keys=opts.text_keys, skip=opts.on_error == "skip", chunk_bytes=opts.chunk_bytes, bos=bos,
                  eod=eod, workers=opts.workers or default_workers(), manifest_path=manifest_path,
                  flags=flags(opts), sample=sample, console=console, progress=progress, log=log)
        try:
            results += write_datasets(pending, prep, job)
        except FastPathRejected as e:
            prep = prep.rejected(str(e))
            log(f"tokenizer: {prep.info.fast_path_note}; starting again")
            results += write_datasets(pending, prep, job)
    order = {(g.name, k): i for i, g in enumerate(groups) for k in opts.text_keys}
    results.sort(key=lambda r: order[(r.name, r.key)])
    return TokenizeResult(results, prep.info, time.perf_counter() - t0, manifest_path)


def output_groups(opts: TokenizeOptions, inputs: list[InputFile]) -> tuple[list[DatasetGroup], Path]:
    """The datasets to write, and the manifest that lists them."""
    keys = opts.text_keys
    if (opts.output_dir is None) == (opts.output_prefix is None):
        raise InputError("give exactly one of --output-dir and --output-prefix")
    if opts.output_prefix is not None:
        prefix = Path(opts.output_prefix).absolute()
        group = DatasetGroup(name=prefix.name, inputs=inputs, prefixes={k: f"{prefix}_{k}_document" for k in keys})
        return [group], prefix.parent / MANIFEST_NAME
    out = Path(opts.output_dir).absolute()
    groups, owner = [], {}
    for f in inputs:
        if f.name in owner:
            raise InputError(f"{f.path} and {owner[f.name]} would both write {out / f.name}_*; "
                             "rename one, or tokenize them in separate runs")
        owner[f.name] = f.path
        groups.append(DatasetGroup(name=f.name, inputs=[f], prefixes={k: f"{out / f.name}_{k}_document" for k in keys}))
    return groups, out / MANIFEST_NAME


def _share(opts: TokenizeOptions, inputs: list[InputFile], log) -> tuple[list[DatasetGroup], Path, dict]:
    """Share K of N's datasets in ``PARTS/shard-K-of-N``, their manifest and the share's record in it (the tokenizer
    is added once loaded), after pinning the plan (``shards``)."""
    k, n = opts.shard
    output_groups(replace(opts, shard=None), inputs)  # what a whole run would refuse (two inputs of one name)
    root = shards.parts_root(opts.output_dir, opts.output_prefix)
    plan = shards.make_plan(inputs, n, shards.output_of(opts.output_dir, opts.output_prefix))
    shards.pin_plan(root, plan)
    out = shards.share_dir(root, k, n)
    pieces = plan.share(k)
    share_opts = replace(opts, output_dir=out if opts.output_dir is not None else None, shard=None,
                         output_prefix=str(out / Path(opts.output_prefix).name) if opts.output_prefix else None)
    groups, manifest_path = output_groups(share_opts, pieces) if pieces else ([], out / MANIFEST_NAME)
    log(f"share {k} of {n}: {plan.describe(k)} → {out}")
    return groups, manifest_path, {"index": k, "of": n, "plan": plan.id, "flags": flags(opts)}


def _not_merged_yet(opts: TokenizeOptions, inputs: list[InputFile], groups: list[DatasetGroup], fingerprint: str,
                    log) -> list[DatasetGroup]:
    """The share's groups whose merged datasets (what ``merge`` makes of them) are not current yet."""
    final, final_manifest = output_groups(replace(opts, shard=None), inputs)
    if opts.force or not final_manifest.exists():
        return groups
    done, _ = _up_to_date(final, read_manifest(final_manifest), final_manifest, fingerprint, flags(opts), False)
    merged = {d.name for d in done}
    left = [g for g in groups if g.name not in merged]
    if len(left) < len(groups):
        log(f"{len(groups) - len(left)} of this share's {len(groups)} datasets are merged and up to date already; "
            "skipping them (--force redoes them)")
    return left


def flags(opts: TokenizeOptions) -> dict:
    """The options a dataset's ids depend on, as its manifest entry records them."""
    return {"append_eod": opts.append_eod, "add_bos": opts.add_bos, "use_fast": opts.use_fast,
            "on_error": opts.on_error, "text_key_order": list(opts.text_keys)}


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def summarize(result: TokenizeResult) -> list[dict]:
    """One row per dataset, as ``keizoku tokenize`` prints its table."""
    several_keys = len({d.key for d in result.datasets}) > 1
    return [{
        "dataset": r.name + (f" [{r.key}]" if several_keys else ""),
        "documents": r.documents, "tokens": r.tokens, "mb": r.input_bytes / 1e6, "seconds": r.seconds,
        "tokens_per_s": r.tokens / r.seconds if r.seconds > 0 else math.nan,
        "skipped": r.skipped, "status": "up to date" if r.up_to_date else "done",
    } for r in result.datasets]


def _check_options(opts: TokenizeOptions) -> None:
    if opts.on_error not in ("stop", "skip"):
        raise InputError(f"--on-error must be 'stop' or 'skip', not {opts.on_error!r}")
    if not opts.text_keys:
        raise InputError("give at least one --text-key")


def _tokenizer_line(info: TokenizerInfo) -> str:
    return (f"tokenizer {info.name_or_path}: {info.class_name}, vocab {info.vocab_size:,}, dtype {info.dtype}; "
            f"ids by {info.engine}" + (f" ({info.fast_path_note})" if info.fast_path_note else ""))


def _special_ids(opts: TokenizeOptions, info: TokenizerInfo) -> tuple[int | None, int | None]:
    """(BOS to prepend, EOD to append), None where the options want none."""
    if opts.append_eod and info.eos_id is None:
        raise InputError(f"{opts.tokenizer}: tokenizer has no eos token to use as EOD; pass --no-append-eod")
    if opts.add_bos and info.bos_id is None:
        raise InputError(f"{opts.tokenizer}: tokenizer has no bos token; drop --add-bos")
    return (info.bos_id if opts.add_bos else None), (info.eos_id if opts.append_eod else None)


def _up_to_date(groups: list[DatasetGroup], manifest: dict, manifest_path: Path, fingerprint: str, flags: dict,
                force: bool) -> tuple[list[DatasetResult], list[DatasetGroup]]:
    """The results of the groups whose datasets are all current (with ``force``, none), and the other groups."""
    done, pending = [], []
    for g in groups:
        entries = {k: manifest["datasets"].get(entry_name(manifest_path, p)) for k, p in g.prefixes.items()}
        if force or not all(e is not None and entry_is_current(e, g.inputs, g.prefixes[k], fingerprint, flags)
                            for k, e in entries.items()):
            pending.append(g)
            continue
        done += [DatasetResult(g.name, k, g.prefixes[k], e["documents"], e["tokens"], e["input_bytes"], e["seconds"],
                               e["skipped"]["count"], up_to_date=True) for k, e in entries.items()]
    return done, pending


def _sample_texts(inputs: list[InputFile], keys: list[str], limit: int = 256 << 10) -> list[str]:
    """Texts from the start of the first input, to verify the fast BPE path on real data."""
    if not inputs:
        return []
    try:
        chunk = next(iter(open_reader(inputs[0].path, keys, chunk_bytes=limit)), None)
        return [t for key_texts in parse_chunk(chunk, keys, skip=True).texts for t in key_texts] if chunk else []
    except (InputError, OSError):
        return []
