"""``keizoku tokenize``, ``keizoku tokenize-merge`` and ``keizoku inspect``: JSONL/Parquet → Megatron indexed datasets
(on one machine, or share by share on many and then merged), and what is in them."""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from keizoku.cli.app import app, console, error, log, out
from keizoku.errors import KeizokuError
from keizoku.rundir import ExitCode


class OnError(str, Enum):
    stop = "stop"
    skip = "skip"


@app.command()
def tokenize(
    inputs: Annotated[list[str], typer.Argument(
        help="Input files, directories (searched recursively) or quoted globs: .jsonl, .jsonl.gz, .jsonl.zst, "
        ".parquet.", show_default=False)],
    tokenizer: Annotated[str, typer.Option("--tokenizer", "-t", help="Hugging Face tokenizer: a local directory or a hub id.",
                                           show_default=False)],
    output_dir: Annotated[Optional[Path], typer.Option(
        "--output-dir", "-o", help="Write one dataset per input file, named like Megatron: "
        "DIR/{stem}_{key}_document.bin/.idx (sub-directories of an input directory are kept).")] = None,
    output_prefix: Annotated[Optional[str], typer.Option(
        "--output-prefix", help="Merge all inputs, in order, into one dataset per key: "
        "PREFIX_{key}_document.bin/.idx (what preprocess_data.py --output-prefix writes).")] = None,
    text_key: Annotated[list[str], typer.Option(
        "--text-key", "-k", help="JSON field (Parquet column) holding the text. Repeat for several keys, "
        "like Megatron's --json-keys: one dataset per key.")] = ["text"],  # noqa: B006
    append_eod: Annotated[bool, typer.Option(
        help="Append EOD (the tokenizer's eos token) to every document. Like Megatron, an empty document "
        "gets no EOD: it is stored as a document with zero tokens.")] = True,
    add_bos: Annotated[bool, typer.Option(
        "--add-bos", help="Prepend the tokenizer's bos token to every document. Off reproduces Megatron-LM "
        "core 0.16's preprocess_data.py (and newer ones with --tokenizer-hf-no-include-special-tokens); on "
        "reproduces core >= 0.17's default for tokenizers whose template adds only BOS (Llama-3, llm-jp-3), "
        "including [BOS, EOD] for an empty document.")] = False,
    use_fast: Annotated[bool, typer.Option(help="Load the fast (Rust) Hugging Face tokenizer.")] = True,
    fast_bpe: Annotated[bool, typer.Option(
        help="For byte-level BPE tokenizers whose merges follow vocabulary rank (Llama-3 and the like), use "
        "keizoku's exact fast BPE (C for the Llama-3 split pattern, tiktoken otherwise) once it is verified to "
        "give Hugging Face's ids on a probe text and on your first documents; Hugging Face otherwise.")] = True,
    workers: Annotated[int, typer.Option("--workers", "-j", help="Worker processes (0 = all cores).")] = 0,
    on_error: Annotated[OnError, typer.Option(
        help="Bad input (malformed JSON, missing/null/non-string text, invalid UTF-8, blank line, truncated "
        "gzip/zstd): 'stop' exits non-zero at the first one with path:line; 'skip' skips the line, counts it and "
        "records it in the manifest.")] = OnError.stop,
    force: Annotated[bool, typer.Option("--force", help="Redo datasets that are complete and up to date.")] = False,
    chunk_mb: Annotated[float, typer.Option(help="Input handed to a worker at a time, in MB.")] = 4.0,
    shard: Annotated[Optional[str], typer.Option(
        "--shard", metavar="K/N", callback=lambda v: _shard(v),
        help="Tokenize only share K of N (K = 1..N) into OUTPUT/parts/shard-K-of-N (--output-prefix P: "
        "P.parts/...): the inputs in order cut into N parts of about equal size, a large uncompressed .jsonl into "
        "byte ranges at line starts. Run every K (an array job: keizoku submit tokenize), then keizoku "
        "tokenize-merge. Resumes like a whole run.", show_default=False)] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or table.")] = False,
) -> None:
    """Tokenize JSONL/Parquet documents into Megatron indexed datasets (.bin/.idx).

    Output is byte-identical to Megatron-LM's tools/preprocess_data.py with
    --tokenizer-type HuggingFaceTokenizer for the same input, tokenizer and flags, and is read by
    megatron-core's IndexedDataset. A keizoku-manifest.json beside the datasets records inputs,
    counts, skipped lines, tokenizer and flags; rerunning skips datasets that are complete and up to
    date with their inputs, so an interrupted run over many files resumes where it stopped.

    Example:

        keizoku tokenize data/ja/ --tokenizer meta-llama/Llama-3.1-8B --output-dir tokenized/ja

    On many nodes: keizoku submit tokenize --profile NAME --tasks N -- ARGS (docs/tokenize.md).
    """
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # numpy's BLAS threads only spin here
    from keizoku.data import tokenize as tk

    opts = tokenize_options(locals())
    try:
        result = tk.tokenize(opts, console=console, progress=not quiet and console.is_terminal,
                             log=(lambda msg: None) if quiet else log)
    except (KeizokuError, ValueError) as e:  # ValueError: a tokenizer that cannot be loaded
        error(str(e))
        raise typer.Exit(ExitCode.FAILED) from None
    except KeyboardInterrupt:
        console.print("[red]interrupted[/red]: unfinished datasets were removed; rerun to resume")
        raise typer.Exit(ExitCode.INTERRUPTED) from None
    if not quiet:
        out.print(_tokenize_table(result, tk.summarize(result)))


def _shard(value: Optional[str]):
    """``--shard K/N`` → (K, N)."""
    if value is None:
        return None
    from keizoku.data.shards import parse_shard

    try:
        return parse_shard(value)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None


def tokenize_options(params: dict):
    """``TokenizeOptions`` from ``keizoku tokenize``'s parameters (as the command, or its parser, has them)."""
    from keizoku.data import tokenize as tk

    return tk.TokenizeOptions(
        inputs=list(params["inputs"]), tokenizer=params["tokenizer"], output_dir=params["output_dir"],
        output_prefix=params["output_prefix"], text_keys=list(params["text_key"]), append_eod=params["append_eod"],
        add_bos=params["add_bos"], use_fast=params["use_fast"], fast_bpe=params["fast_bpe"],
        workers=params["workers"], on_error=OnError(params["on_error"]).value, force=params["force"],
        chunk_bytes=max(1, int(params["chunk_mb"] * (1 << 20))), shard=params.get("shard"),
    )


@app.command("tokenize-merge")
def tokenize_merge(
    output_dir: Annotated[Optional[Path], typer.Option(
        "--output-dir", "-o", help="The --output-dir the shares were tokenized for (their parts: DIR/parts).")] = None,
    output_prefix: Annotated[Optional[str], typer.Option(
        "--output-prefix", help="The --output-prefix the shares were tokenized for (their parts: "
        "PREFIX.parts).")] = None,
    check: Annotated[bool, typer.Option("--check", help="Only show each share's state (and its task's log); exit 0 "
                                        "if every share is complete, 1 if not.")] = False,
    remove_parts: Annotated[bool, typer.Option("--remove-parts", help="Once everything is merged, delete the shares' "
                                               "parts and the plan (kept by default).")] = False,
    force: Annotated[bool, typer.Option("--force", help="Merge datasets again that are merged and up to "
                                        "date.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a .bin/.idx at a destination that the "
                                            "output's manifest does not list (not keizoku's).")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No table.")] = False,
) -> None:
    """Join the shares of `keizoku tokenize --shard K/N` into what one run over all the inputs writes.

    Checks that every share is complete and that they agree (flags, tokenizer), then writes per dataset one
    .bin/.idx, byte for byte what `keizoku tokenize` without --shard writes (the .bin copied at disk speed, the
    .idx rebuilt from the parts'; a dataset of one part is hard-linked), and its manifest entry. Nothing is
    written if a share is missing, incomplete or disagrees: the message names it (and its task's log).

    Example:

        keizoku tokenize-merge --output-dir tokenized/ja

    Exit status: 0 merged (or up to date; --check: every share complete); 1 a share is not complete, the shares
    disagree, or a destination is not keizoku's; 2 bad arguments.
    """
    from keizoku.data import merge as mg

    if (output_dir is None) == (output_prefix is None):
        error("give exactly one of --output-dir and --output-prefix (the one the shares were tokenized for)")
        raise typer.Exit(ExitCode.CONFIG)
    try:
        if check:
            raise typer.Exit(show_shares(output_dir, output_prefix))
        result = mg.merge(output_dir, output_prefix, force=force, overwrite=overwrite, remove_parts=remove_parts,
                          log=(lambda msg: None) if quiet else log)
    except (KeizokuError, OSError, ValueError) as e:
        error(str(e))
        raise typer.Exit(ExitCode.FAILED) from None
    if not quiet:
        out.print(_merge_table(result))


def show_shares(output_dir, output_prefix, as_json: bool = False) -> int:
    """Print each share's state (and its task's log); ExitCode.OK if all are complete, else FAILED."""
    import json

    from keizoku.data import merge as mg

    root, plan, states = mg.share_states(output_dir, output_prefix)
    rows = mg.describe_states(states)
    done = sum(s.complete for s in states)
    if as_json:
        print(json.dumps({"parts": str(root), "shares": plan.shares, "complete": done, "rows": rows}, indent=1))
    else:
        out.print(_shares_table(root, rows))
        log(f"{done} of {plan.shares} shares complete" + (
            "; keizoku tokenize-merge merges them (and leaves merged datasets that are current alone)"
            if done == plan.shares else "; run the others (keizoku tokenize … --shard K/N resumes a share)"))
    return ExitCode.OK if done == plan.shares else ExitCode.FAILED


def _shares_table(root: Path, rows: list[dict]) -> Table:
    table = Table(title=f"shares — {escape(str(root))}", title_justify="left")
    for col in ("share", "pieces", "MB", "state", "detail", "log"):
        table.add_column(col, justify="right" if col == "MB" else "left", overflow="fold")
    for r in rows:
        table.add_row(r["share"], escape(r["pieces"]), f"{r['mb']:,.1f}", r["state"], escape(r["detail"]),
                      escape(r["log"]))
    return table


def _merge_table(result) -> Table:
    several_keys = len({d.key for d in result.datasets}) > 1
    table = Table(title=f"keizoku tokenize-merge — {escape(str(result.manifest))}", title_justify="left")
    for col in ("dataset", "docs", "tokens", "parts", "MB", "seconds", "status"):
        table.add_column(col, justify="left" if col in ("dataset", "status") else "right", overflow="fold")
    for d in result.datasets:
        table.add_row(escape(d.name + (f" [{d.key}]" if several_keys else "")), f"{d.documents:,}", f"{d.tokens:,}",
                      str(d.parts), f"{d.input_bytes / 1e6:,.2f}", f"{d.seconds:.2f}", d.status)
    return table


def _tokenize_table(result, rows: list[dict]) -> Table:
    """One row per dataset, and the total of those made by this run."""
    table = Table(title=f"keizoku tokenize — {escape(str(result.manifest))}", title_justify="left",
                  caption=escape(_engine_caption(result.tokenizer)) if result.tokenizer else None,
                  caption_justify="left")
    for col in ("dataset", "docs", "tokens", "MB", "seconds", "tokens/s", "skipped", "status"):
        table.add_column(col, justify="left" if col in ("dataset", "status") else "right", no_wrap=col != "dataset",
                         overflow="fold", min_width=12 if col == "dataset" else None)
    for r in rows:
        table.add_row(escape(r["dataset"]), f"{r['documents']:,}", f"{r['tokens']:,}", f"{r['mb']:,.2f}",
                      f"{r['seconds']:.2f}", f"{r['tokens_per_s']:,.0f}", f"{r['skipped']:,}", r["status"])
    fresh = [r for r in rows if r["status"] == "done"]
    if fresh:
        tokens = sum(r["tokens"] for r in fresh)
        mb = sum(r["mb"] for r in fresh)
        table.add_section()
        table.add_row("total (this run)", f"{sum(r['documents'] for r in fresh):,}", f"{tokens:,}", f"{mb:,.2f}",
                      f"{result.seconds:.2f}", f"{tokens / result.seconds:,.0f}",
                      f"{sum(r['skipped'] for r in fresh):,}", f"{mb / result.seconds:,.2f} MB/s")
    return table


def _engine_caption(info) -> str:
    """What computed the ids; a tokenizer without a fast path of keizoku's says so, with why."""
    fast = info.engine.startswith("keizoku.")
    return f"ids by {info.engine}" + ("" if fast else f" — no keizoku fast path: {info.fast_path_note}")


@app.command()
def inspect(
    path: Annotated[str, typer.Argument(help="A dataset prefix (PATH for PATH.bin/PATH.idx) or a directory.",
                                        show_default=False)],
    decode: Annotated[int, typer.Option("--decode", "-n", help="Print the first N documents decoded.")] = 0,
    tokenizer: Annotated[Optional[str], typer.Option(
        "--tokenizer", "-t", help="Tokenizer for --decode (default: the one recorded in the manifest).")] = None,
) -> None:
    """Show documents, tokens, dtype and the document-length histogram of indexed datasets."""
    from keizoku.data.inspect import manifest_entry, resolve, stats

    try:
        prefixes, manifest_path, manifest = resolve(path)
        all_stats = [stats(prefix) for prefix in prefixes]
        out.print(_stats_table(path, prefixes, all_stats))
        if len(prefixes) == 1:
            out.print(_histogram_table(all_stats[0]["histogram"]))
            entry = manifest_entry(manifest_path, manifest, prefixes[0])
            if entry:
                out.print(_provenance(entry), highlight=False, markup=False)
        if decode:
            for prefix in prefixes:
                _print_decoded(prefix, decode, tokenizer or _recorded_tokenizer(manifest_entry(manifest_path, manifest,
                                                                                               prefix), prefix))
    except (OSError, ValueError, KeizokuError) as e:  # a manifest, a tokenizer, a dataset that cannot be read
        error(str(e))
        raise typer.Exit(ExitCode.FAILED) from None


def _stats_table(path: str, prefixes: list[str], all_stats: list[dict]) -> Table:
    summary = Table(title=escape(str(path)), title_justify="left")
    for col in ("dataset", "documents", "empty", "tokens", "dtype", "mean len", "p50", "p99", "max"):
        summary.add_column(col, justify="left" if col == "dataset" else "right",
                           overflow="fold" if col == "dataset" else "ellipsis")  # names differ at their ends
    for prefix, s in zip(prefixes, all_stats):
        name = Path(prefix).relative_to(path) if Path(path).is_dir() else Path(prefix).name  # a/x and b/x
        summary.add_row(escape(str(name)), f"{s['documents']:,}", f"{s['empty_documents']:,}", f"{s['tokens']:,}",
                        s["dtype"], f"{s.get('mean', 0):,.1f}", f"{s.get('p50', 0):,.0f}", f"{s.get('p99', 0):,.0f}",
                        f"{s.get('max', 0):,}")
    return summary


def _histogram_table(histogram: list[tuple[str, int]]) -> Table:
    hist = Table(title="document length (tokens)", title_justify="left")
    hist.add_column("tokens", justify="right")
    hist.add_column("documents", justify="right")
    hist.add_column("")
    peak = max((n for _, n in histogram), default=1) or 1
    for bucket, n in histogram:
        hist.add_row(bucket, f"{n:,}", "█" * max(1 if n else 0, round(40 * n / peak)))
    return hist


def _provenance(entry: dict) -> str:
    """What the manifest says the dataset was made from, and how."""
    inputs = ", ".join(i["path"] for i in entry["inputs"][:3]) + (" …" if len(entry["inputs"]) > 3 else "")
    tok = entry["tokenizer"]
    return (f"made from {inputs}; tokenizer {tok['name_or_path']} ({tok['class']}, vocab {tok['vocab_size']:,}); "
            f"flags {entry['flags']}; skipped {entry['skipped']['count']:,} lines")


def _recorded_tokenizer(entry: dict | None, prefix: str) -> str:
    if entry is None:
        error(f"{prefix}: no manifest records its tokenizer; pass --tokenizer")
        raise typer.Exit(ExitCode.FAILED)
    return entry["tokenizer"]["name_or_path"]


def _print_decoded(prefix: str, n: int, tokenizer: str) -> None:
    from keizoku.data.inspect import decode

    for i, length, text in decode(prefix, n, tokenizer):
        out.rule(f"{escape(Path(prefix).name)} · document {i} · {length:,} tokens")
        out.print(text, markup=False, highlight=False)
