"""``keizoku tokenize-merge``: the shares of a sharded run (``shards``) joined into what one run over every input
writes — the same ``.bin``/``.idx``, byte for byte, and a manifest entry per dataset.

1. **Every share is complete** (``share_states``): share K's manifest (``PARTS/shard-K-of-N/``) was written for
   this plan, and lists every dataset of its pieces, current (``manifest.entry_is_current``: its inputs — and
   ranges — unchanged, its ``.bin``/``.idx`` of their recorded sizes), or the merged dataset they belong to is
   current already (a share does not tokenize again what is merged). A share with no pieces has nothing to do.
2. **The shares agree**: the same flags (``--add-bos``, ``--append-eod``, keys …: each share's last run records
   them) and the same tokenizer (fingerprint) and dtype in every part. Otherwise nothing is written and the
   message names the shares that differ.
3. **Each merged dataset** (``--output-dir``: one per input, ``OUT/{name}_{key}_document``; ``--output-prefix``:
   one, ``PREFIX_{key}_document``) is its parts, in share order, concatenated (``indexed.concatenate``: the
   ``.bin`` by ``copy_file_range``, the ``.idx`` rebuilt from the parts' indices; a dataset of one part is
   hard-linked) under staging names and renamed into place, then entered in the output's manifest: its inputs
   (a split file as ``ranges``, see ``manifest``), documents, tokens, skipped records, the tokenizer, flags;
   ``seconds`` adds the parts' (the work), ``merged_from`` says from which shares and how long the merge took.
   A merged dataset already current is left alone (``--force`` merges it again). A ``.bin``/``.idx`` at a
   destination that the output's manifest does not list is not keizoku's: it is replaced only with
   ``--overwrite``.
4. The parts stay (a blend may list them: each share directory is a keizoku output directory) unless
   ``--remove-parts`` says otherwise, once everything is merged; ``submit/``, ``logs/`` and ``jobs.jsonl`` stay.

Skipped records keep their locations: real line numbers, except in a share that began inside a split file, which
gives byte offsets (``shards``).
"""

from __future__ import annotations

import re
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from keizoku import __version__
from keizoku.data import shards
from keizoku.data.indexed import concatenate, dataset_paths
from keizoku.data.inputs import InputFile
from keizoku.data.manifest import (
    MANIFEST_NAME,
    MAX_SKIP_EXAMPLES,
    entry_is_current,
    entry_name,
    read_manifest,
    update_manifest,
)
from keizoku.errors import KeizokuError
from keizoku.rundir import discard, read_jsonl


class MergeError(KeizokuError):
    """Shares that cannot be merged (incomplete, of another plan, disagreeing), or a destination not keizoku's."""


@dataclass
class ShareState:
    """One share, as its directory says."""

    index: int
    of: int
    dir: Path
    pieces: list[InputFile]
    bytes: int
    state: str = "done"  # done, empty (no pieces), not run, incomplete, other plan
    detail: str = ""
    flags: dict | None = None  # of the share's last run
    tokenizer: str | None = None  # the fingerprint of its last run's tokenizer
    parts: dict[tuple[str, str], tuple[str, dict]] = field(default_factory=dict)  # (group, key) -> (prefix, entry)
    log: str | None = None  # the task's log, if keizoku submit tokenize ran it

    @property
    def complete(self) -> bool:
        return self.state in ("done", "empty")


@dataclass
class MergedDataset:
    name: str
    key: str
    prefix: str
    documents: int
    tokens: int
    parts: int
    input_bytes: int
    seconds: float  # the merge's, for this dataset
    status: str  # merged, linked (one part), up to date


@dataclass
class MergeResult:
    datasets: list[MergedDataset]
    manifest: Path
    seconds: float
    removed: list[Path] = field(default_factory=list)


def _plan(output_dir, output_prefix) -> tuple[Path, shards.Plan]:
    root = shards.parts_root(output_dir, output_prefix)
    plan = shards.read_plan(root)
    if plan is None:
        flag = f"--output-dir {output_dir}" if output_dir is not None else f"--output-prefix {output_prefix}"
        raise MergeError(f"{root / shards.PLAN_NAME}: not found: no shares were tokenized for {flag} (keizoku "
                         f"tokenize … {flag} --shard K/N, or keizoku submit tokenize, makes them)")
    return root, plan


def _groups(plan: shards.Plan, output_prefix) -> list[tuple[str, list[int], list[Path]]]:
    """The merged datasets' names, each with the shares that hold its parts, in order, and its inputs: one per
    input (``--output-dir``), or one of all (``--output-prefix``)."""
    if "dir" in plan.output:
        return [(f["name"], plan.holders(i), [Path(f["path"])]) for i, f in enumerate(plan.inputs)]
    return [(Path(output_prefix).name, [k for k in range(1, plan.shares + 1) if plan.pieces[k - 1]],
             [Path(f["path"]) for f in plan.inputs])]


def _output_manifest(output_dir, output_prefix) -> Path:
    return (Path(output_dir).absolute() if output_dir is not None else Path(output_prefix).absolute().parent) \
        / MANIFEST_NAME


def share_states(output_dir=None, output_prefix=None) -> tuple[Path, shards.Plan, list[ShareState]]:
    """The parts' directory, the plan and the state of each share (``keizoku tokenize-merge --check``)."""
    root, plan = _plan(output_dir, output_prefix)
    logs = task_logs(root)
    out_manifest = _output_manifest(output_dir, output_prefix)
    merged = read_manifest(out_manifest)["datasets"]
    final_inputs = {name: inputs for name, _, inputs in _groups(plan, output_prefix)}
    states = []
    for k in range(1, plan.shares + 1):
        s = ShareState(k, plan.shares, shards.share_dir(root, k, plan.shares), plan.share(k), plan.share_bytes(k),
                       log=logs.get(k))
        states.append(s)
        if not s.pieces:
            s.state, s.detail = "empty", "no pieces of the inputs: nothing to do"
            continue
        manifest_path = s.dir / MANIFEST_NAME
        manifest = read_manifest(manifest_path)
        record = manifest.get("shard")
        if not manifest_path.exists() or not isinstance(record, dict):
            s.state, s.detail = "not run", f"no {manifest_path}"
            continue
        if record.get("plan") != plan.id or (record.get("index"), record.get("of")) != (k, plan.shares):
            s.state, s.detail = "other plan", f"{manifest_path} was written for another plan; run the share again"
            continue
        s.flags, s.tokenizer = record.get("flags") or {}, record.get("tokenizer")
        keys = list(s.flags.get("text_key_order") or [])
        names = [f.name for f in s.pieces] if "dir" in plan.output else [Path(output_prefix).name]
        inputs = {f.name: [f] for f in s.pieces} if "dir" in plan.output else {names[0]: s.pieces}
        missing = []
        for name in names:
            for key in keys:
                prefix = str(s.dir / f"{name}_{key}_document")
                entry = manifest["datasets"].get(entry_name(manifest_path, prefix))
                fingerprint = (entry or {}).get("tokenizer", {}).get("fingerprint")
                if entry is not None and entry_is_current(entry, inputs[name], prefix, fingerprint, s.flags):
                    s.parts[(name, key)] = (prefix, entry)
                    continue
                target = _target(output_dir, output_prefix, name, key)
                final = merged.get(entry_name(out_manifest, target))
                if final is None or not entry_is_current(final, final_inputs[name], target, s.tokenizer, s.flags):
                    missing.append(f"{name} [{key}]" if len(keys) > 1 else name)
        if missing or not keys:
            s.state = "incomplete"
            s.detail = (f"{len(missing)} of {len(names) * len(keys)} datasets not made (or out of date): "
                        f"{_few(missing)}")
    return root, plan, states


def task_logs(root: Path) -> dict[int, str]:
    """Share → the log of the newest task that ran it, from ``PARTS/jobs.jsonl`` (``keizoku submit tokenize``)."""
    logs: dict[int, str] = {}
    for record in read_jsonl(root / "jobs.jsonl") if (root / "jobs.jsonl").exists() else []:
        for k, log in enumerate(record.get("task_logs") or [], 1):
            if log:
                logs[k] = log
    return logs


def merge(output_dir=None, output_prefix=None, *, force: bool = False, overwrite: bool = False,
          remove_parts: bool = False, log: Callable[[str], None] = print) -> MergeResult:
    """Merge the shares of the sharded run that writes ``output_dir`` (or ``output_prefix``): see the module
    docstring. Raises MergeError, having written nothing, when a share is incomplete or the shares disagree."""
    t0 = time.perf_counter()
    root, plan, states = share_states(output_dir, output_prefix)
    unfinished = [s for s in states if not s.complete]
    if unfinished:
        k = plan.shares
        what = "; ".join(f"share {s.index} ({s.state}: {s.detail}" + (f"; log {s.log}" if s.log else "") + ")"
                         for s in unfinished[:4]) + ("; …" if len(unfinished) > 4 else "")
        raise MergeError(f"{root}: {len(unfinished)} of {k} shares are not complete: {what}; run them (keizoku "
                         f"tokenize … --shard K/{k}: a rerun resumes), then merge again")
    flags, fingerprint = _agreement(root, states)
    keys = list(flags["text_key_order"])
    out_manifest = _output_manifest(output_dir, output_prefix)
    manifest = read_manifest(out_manifest)
    groups = _groups(plan, output_prefix)
    targets = {(name, key): _target(output_dir, output_prefix, name, key) for name, _, _ in groups for key in keys}
    _check_destinations(targets, manifest, out_manifest, overwrite)

    results, states_by_k = [], {s.index: s for s in states}
    for name, holders, inputs in groups:
        current = {key: manifest["datasets"].get(entry_name(out_manifest, targets[(name, key)])) for key in keys}
        if not force and all(e is not None and entry_is_current(e, inputs, targets[(name, key)], fingerprint, flags)
                             for key, e in current.items()):
            results += [MergedDataset(name, key, targets[(name, key)], e["documents"], e["tokens"], len(holders),
                                      e["input_bytes"], 0.0, "up to date") for key, e in current.items()]
            continue
        entries = {}
        for key in keys:
            t = time.perf_counter()
            parts = [states_by_k[k].parts.get((name, key)) for k in holders]
            if None in parts:
                k = holders[parts.index(None)]
                raise MergeError(f"share {k} has no part of {name} [{key}] (it was merged and current when the share "
                                 f"ran): run it again with --force (keizoku tokenize … --shard {k}/{plan.shares} "
                                 "--force), then merge")
            made = concatenate([p for p, _ in parts], targets[(name, key)])
            seconds = time.perf_counter() - t
            entry = _merged_entry(key, [e for _, e in parts], [states_by_k[k].dir / MANIFEST_NAME for k in holders],
                                  made, flags, plan, holders, seconds)
            entries[entry_name(out_manifest, targets[(name, key)])] = entry
            results.append(MergedDataset(name, key, targets[(name, key)], made.documents, made.tokens, len(parts),
                                         entry["input_bytes"], seconds, "linked" if made.linked else "merged"))
        update_manifest(out_manifest, entries)
    removed = []
    if remove_parts:
        for s in states:
            if s.dir.exists():
                discard(s.dir)
                removed.append(s.dir)
        discard(root / shards.PLAN_NAME)
        log(f"removed the parts: {len(removed)} share directories and {root / shards.PLAN_NAME} "
            f"(kept: {root}/submit, logs, jobs.jsonl)")
    return MergeResult(results, out_manifest, time.perf_counter() - t0, removed)


def _target(output_dir, output_prefix, name: str, key: str) -> str:
    if output_dir is not None:
        return str(Path(output_dir).absolute() / f"{name}_{key}_document")
    return f"{Path(output_prefix).absolute()}_{key}_document"


def _agreement(root: Path, states: list[ShareState]) -> tuple[dict, str]:
    """The flags and tokenizer fingerprint every share has; MergeError naming the shares that differ."""
    ran = [s for s in states if s.state == "done"]
    if not ran:
        raise MergeError(f"{root}: no share holds any input: nothing to merge")
    first = ran[0]
    for s in ran[1:]:
        if s.flags != first.flags:
            diff = sorted(k for k in set(s.flags) | set(first.flags) if s.flags.get(k) != first.flags.get(k))
            raise MergeError(f"{root}: share {s.index} was tokenized with other flags than share {first.index} ("
                             + ", ".join(f"{k}: {s.flags.get(k)} vs {first.flags.get(k)}" for k in diff)
                             + "); run the shares that differ again with the same options as the others (--force)")
    seen: dict[str | None, list[str]] = {}  # tokenizer fingerprint -> the shares (and the tokenizer) that used it
    for s in ran:
        used = {s.tokenizer: None}
        for _, entry in s.parts.values():
            tok = entry.get("tokenizer", {})
            used[tok.get("fingerprint")] = tok.get("name_or_path")
        for fingerprint, name in used.items():
            seen.setdefault(fingerprint, []).append(f"share {s.index}" + (f" ({name})" if name else ""))
    if len(seen) > 1:
        groups = [v[0] for v in seen.values()]
        raise MergeError(f"{root}: the shares were tokenized with different tokenizers: {' and '.join(groups)}; "
                         "run the shares that differ again with the same --tokenizer as the others (--force)")
    fingerprint = next(iter(seen))
    return first.flags, fingerprint


def _check_destinations(targets: dict, manifest: dict, manifest_path: Path, overwrite: bool) -> None:
    """A dataset at a destination that the output's manifest does not list is not keizoku's: MergeError, unless
    ``overwrite``."""
    if overwrite:
        return
    foreign = [str(path) for prefix in targets.values() for path in dataset_paths(prefix)
               if path.exists() and entry_name(manifest_path, prefix) not in manifest["datasets"]]
    if foreign:
        raise MergeError(f"{_few(foreign)}: exist{'s' if len(foreign) == 1 else ''}, and {manifest_path} does not "
                         "list it as keizoku's; move it away, or pass --overwrite to replace it")


def _merged_entry(key: str, parts: list[dict], manifests: list[Path], made, flags: dict, plan: shards.Plan,
                  holders: list[int], seconds: float) -> dict:
    if made.documents != sum(e["documents"] for e in parts) or made.tokens != sum(e["tokens"] for e in parts):
        raise MergeError(f"the parts of {key} hold other counts than their manifests say: tokenize those shares "
                         "again (--force)")
    work = sum(e.get("seconds") or 0.0 for e in parts)
    return {
        "key": key,
        "inputs": _merged_inputs([r for e in parts for r in e["inputs"]]),
        "documents": made.documents,
        "empty_documents": made.empty_documents,
        "tokens": made.tokens,
        "dtype": str(made.dtype),
        "bin_bytes": made.bin_bytes,
        "idx_bytes": made.idx_bytes,
        "input_bytes": sum(e["input_bytes"] for e in parts),
        "skipped": _merged_skipped(parts),
        "tokenizer": _tokenizer(parts[0]["tokenizer"], manifests[0]),
        "flags": flags,
        "keizoku_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(work, 3),
        "tokens_per_second": round(made.tokens / work, 1) if work > 0 else None,
        "merged_from": {"shares": holders, "of": plan.shares, "plan": plan.id, "seconds": round(seconds, 3)},
    }


def _merged_inputs(records: list[dict]) -> list[dict]:
    """The parts' input records, in order, a split file's ranges made one record again (``ranges``)."""
    out: list[dict] = []
    for r in records:
        if "range" not in r:
            out.append(r)
            continue
        piece = {k: r[k] for k in ("range", "hashed", "sha256", "lines")}
        if out and out[-1].get("path") == r["path"] and "ranges" in out[-1]:
            out[-1]["ranges"].append(piece)
        else:
            out.append({"path": r["path"], "size": r["size"], "mtime_ns": r["mtime_ns"], "sha256": None,
                        "ranges": [piece]})
    return out


def _merged_skipped(parts: list[dict]) -> dict:
    """The parts' ``skipped``, added up; a record skipped in a share that began inside a file gets its real path
    and line back (the lines of the file's earlier ranges, which their records count, come before it)."""
    by_reason: Counter = Counter()
    examples, lines_before = [], Counter()
    for entry in parts:
        where = {}
        for r in entry["inputs"]:
            if "range" in r:
                if r["range"][0] > 0:
                    where[str(InputFile(Path(r["path"]), "", tuple(r["range"])).where)] = (r["path"],
                                                                                           lines_before[r["path"]])
                lines_before[r["path"]] += r["lines"]
        skipped = entry["skipped"]
        by_reason.update(skipped.get("by_reason", {}))
        for x in skipped.get("examples", []):
            if x.get("path") in where and x.get("line") is not None:
                path, before = where[x["path"]]
                x = {**x, "path": path, "line": before + x["line"],
                     "reason": re.sub(_BYTE_OFFSET, "", x.get("reason", ""))}
            examples.append(x)
    return {"count": sum(e["skipped"].get("count", 0) for e in parts), "by_reason": dict(by_reason),
            "examples": examples[:MAX_SKIP_EXAMPLES]}


_BYTE_OFFSET = r"(?: \(at byte offset [\d,]+\)|: at byte offset [\d,]+)$"  # what shards.located adds


def _tokenizer(tokenizer: dict, manifest_path: Path) -> dict:
    """A part's tokenizer record, its path made absolute where the part's manifest kept it relative (it is stored
    again relative to the output's manifest, where it belongs there)."""
    recorded = tokenizer.get("name_or_path")
    if isinstance(recorded, str) and (recorded == "." or recorded.startswith("./")):
        return {**tokenizer, "name_or_path": str((manifest_path.parent / recorded).resolve())}
    return dict(tokenizer)


def _few(items: list[str], n: int = 4) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def describe_states(states: list[ShareState]) -> list[dict]:
    """One row per share, for ``--check``."""
    return [{"share": f"{s.index}/{s.of}", "pieces": ", ".join(f.name + (f" [{f.span[0]:,}–{f.span[1]:,})"
                                                                              if f.span else "") for f in s.pieces[:3])
             + (f" +{len(s.pieces) - 3}" if len(s.pieces) > 3 else ""), "mb": s.bytes / 1e6, "state": s.state,
             "detail": s.detail, "log": s.log or ""} for s in states]
