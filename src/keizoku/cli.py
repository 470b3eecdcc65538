"""The ``keizoku`` command line."""

from __future__ import annotations

import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from keizoku import __version__

app = typer.Typer(
    name="keizoku",
    help="keizoku (継続): continual pre-training of Hugging Face LLMs — "
    "JSONL → Megatron datasets → training → Hugging Face checkpoint.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="markdown",
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
console = Console(stderr=True)
out = Console()


def _error(message: str) -> None:
    console.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)


def _load_config(path: Path, overrides: list[str] | None, exit_code: int):
    """The validated config, or every problem printed (one line per key) and exit."""
    from keizoku.config import ConfigError, load

    try:
        return load(path, overrides or [])
    except ConfigError as e:
        for line in str(e).splitlines():
            _error(line)
        raise typer.Exit(exit_code) from None


def _version(value: bool) -> None:
    if value:
        print(f"keizoku {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True,
                                                    help="Print the version and exit.")] = None,
) -> None:
    pass


class OnError(str, Enum):
    stop = "stop"
    skip = "skip"


@app.command()
def quickstart(
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Where everything is written.")] = Path("quickstart-out"),
    force: Annotated[bool, typer.Option("--force", help="Redo every step, even those already finished.")] = False,
    steps: Annotated[int, typer.Option(help="Continual pre-training steps (8 sequences of 256 tokens each).",
                                       min=1)] = 60,
    base_steps: Annotated[int, typer.Option(help="Pre-training steps of the tiny base model on English.",
                                            min=1)] = 30,
) -> None:
    """The whole pipeline on a CPU in about a minute, with bundled data and a tiny model.

    Splits the bundled Japanese and English samples, tokenizes them, pre-trains a tiny Llama-shaped base
    model on English, continues its pre-training on Japanese with English replay, exports it to Hugging Face
    format (logits verified) and generates from it with transformers. Ends with validation losses before and
    after, a loss plot, where everything is, and the commands to run next on real data. A rerun reuses the
    steps that are finished.
    """
    from keizoku.config import ConfigError
    from keizoku.quickstart import Options, QuickstartError, run
    from keizoku.train.model import ModelLoadError

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never wait on the hub
    try:
        run(Options(out=out_dir, steps=steps, base_steps=base_steps, force=force), console=out)
    except (QuickstartError, ConfigError, ModelLoadError, OSError) as e:
        _error(str(e))
        sys.stdout.flush()
        os._exit(1)
    # as in train: leave without interpreter teardown (gloo threads)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


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
    """
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # numpy's BLAS threads only spin here
    from keizoku.data.readers import InputError
    from keizoku.data.tokenize import TokenizeError, TokenizeOptions, run, summarize

    opts = TokenizeOptions(
        inputs=inputs, tokenizer=tokenizer, output_dir=output_dir, output_prefix=output_prefix,
        text_keys=list(text_key), append_eod=append_eod, add_bos=add_bos, use_fast=use_fast, fast_bpe=fast_bpe,
        workers=workers, on_error=on_error.value, force=force, chunk_bytes=max(1, int(chunk_mb * (1 << 20))),
    )
    log = (lambda *a: None) if quiet else (lambda msg: console.print(msg, highlight=False, markup=False, soft_wrap=True))
    try:
        result = run(opts, console=console, progress=not quiet and console.is_terminal, log=log)
    except (InputError, TokenizeError, ValueError) as e:
        _error(str(e))
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        console.print("[red]interrupted[/red]: unfinished datasets were removed; rerun to resume")
        raise typer.Exit(130) from None
    if quiet:
        return
    table = Table(title=f"keizoku tokenize — {result.manifest}", title_justify="left")
    for col in ("dataset", "docs", "tokens", "MB", "seconds", "tokens/s", "skipped", "status"):
        table.add_column(col, justify="left" if col in ("dataset", "status") else "right", no_wrap=col != "dataset",
                         overflow="fold", min_width=12 if col == "dataset" else None)
    rows = summarize(result)
    fresh = [r for r in rows if r["status"] == "done"]
    for r in rows:
        table.add_row(r["dataset"], f"{r['documents']:,}", f"{r['tokens']:,}", f"{r['mb']:,.2f}",
                      f"{r['seconds']:.2f}", f"{r['tokens_per_s']:,.0f}", f"{r['skipped']:,}", r["status"])
    if fresh:
        tokens = sum(r["tokens"] for r in fresh)
        mb = sum(r["mb"] for r in fresh)
        table.add_section()
        table.add_row("total (this run)", f"{sum(r['documents'] for r in fresh):,}", f"{tokens:,}", f"{mb:,.2f}",
                      f"{result.seconds:.2f}", f"{tokens / result.seconds:,.0f}",
                      f"{sum(r['skipped'] for r in fresh):,}", f"{mb / result.seconds:,.2f} MB/s")
    out.print(table)


@app.command()
def inspect(
    path: Annotated[str, typer.Argument(help="A dataset prefix (PATH for PATH.bin/PATH.idx) or a directory.",
                                        show_default=False)],
    decode: Annotated[int, typer.Option("--decode", "-n", help="Print the first N documents decoded.")] = 0,
    tokenizer: Annotated[Optional[str], typer.Option(
        "--tokenizer", "-t", help="Tokenizer for --decode (default: the one recorded in the manifest).")] = None,
) -> None:
    """Show documents, tokens, dtype and the document-length histogram of indexed datasets."""
    from keizoku.data.inspect import decode as decode_docs
    from keizoku.data.inspect import manifest_entry, resolve, stats

    try:
        prefixes, manifest_path, manifest = resolve(path)
    except (FileNotFoundError, ValueError) as e:
        _error(str(e))
        raise typer.Exit(1) from None
    summary = Table(title=str(path), title_justify="left")
    for col in ("dataset", "documents", "empty", "tokens", "dtype", "mean len", "p50", "p99", "max"):
        summary.add_column(col, justify="left" if col == "dataset" else "right")
    all_stats = []
    for prefix in prefixes:
        s = stats(prefix)
        all_stats.append(s)
        summary.add_row(Path(prefix).name, f"{s['documents']:,}", f"{s['empty_documents']:,}", f"{s['tokens']:,}",
                        s["dtype"], f"{s.get('mean', 0):,.1f}", f"{s.get('p50', 0):,.0f}", f"{s.get('p99', 0):,.0f}",
                        f"{s.get('max', 0):,}")
    out.print(summary)
    if len(prefixes) == 1:
        s = all_stats[0]
        hist = Table(title="document length (tokens)", title_justify="left")
        hist.add_column("tokens", justify="right")
        hist.add_column("documents", justify="right")
        hist.add_column("")
        peak = max((n for _, n in s["histogram"]), default=1) or 1
        for bucket, n in s["histogram"]:
            hist.add_row(bucket, f"{n:,}", "█" * max(1 if n else 0, round(40 * n / peak)))
        out.print(hist)
        entry = manifest_entry(manifest_path, manifest, prefixes[0])
        if entry:
            inputs = ", ".join(i["path"] for i in entry["inputs"][:3]) + (" …" if len(entry["inputs"]) > 3 else "")
            out.print(f"made from {inputs}; tokenizer {entry['tokenizer']['name_or_path']} "
                      f"({entry['tokenizer']['class']}, vocab {entry['tokenizer']['vocab_size']:,}); "
                      f"flags {entry['flags']}; skipped {entry['skipped']['count']:,} lines", highlight=False)
    if decode:
        for prefix in prefixes:
            tok = tokenizer
            if tok is None:
                entry = manifest_entry(manifest_path, manifest, prefix)
                if entry is None:
                    _error(f"{prefix}: no manifest records its tokenizer; pass --tokenizer")
                    raise typer.Exit(1)
                tok = entry["tokenizer"]["name_or_path"]
            for i, n, text in decode_docs(prefix, decode, tok):
                out.rule(f"{Path(prefix).name} · document {i} · {n:,} tokens")
                out.print(text, markup=False, highlight=False)


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="A keizoku YAML config (see keizoku config defaults).",
                                           show_default=False)],
    overrides: Annotated[Optional[list[str]], typer.Argument(help="key.path=value overrides.", show_default=False)] = None,
) -> None:
    """Continual pre-training from a Hugging Face model on tokenized datasets.

    One process on a laptop, or under torchrun on many GPUs and nodes:
    torchrun --nproc-per-node 8 -m keizoku train CONFIG.yaml. Resumes from the run's latest checkpoint
    (checkpoint.resume: auto). Exit status: 0 done, 1 failed, 2 bad config, 3 stopped by SIGTERM/SIGUSR1
    after saving (resubmit to continue).
    """
    from keizoku.data.blend import DataError
    from keizoku.engines import run
    from keizoku.engines.torch.trainer import TrainingError
    from keizoku.train.model import ModelLoadError

    cfg = _load_config(config, overrides, exit_code=2)
    try:
        status = run(cfg)
    except (TrainingError, DataError, ModelLoadError, NotImplementedError) as e:
        _error(str(e))
        status = 1
    # Everything is written and the process group is gone; leave without interpreter teardown, where
    # C++ threads of torch.distributed/gloo can abort the process ("terminate called without an active
    # exception") and turn a finished run into a failed exit status.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="A keizoku run directory.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the Hugging Face model.", show_default=False)],
    step: Annotated[Optional[int], typer.Option(help="Checkpoint step (default: the latest).")] = None,
    verify: Annotated[bool, typer.Option(help="Reload the export and check it reproduces the logits.")] = True,
) -> None:
    """Write a checkpoint as a Hugging Face model (safetensors, config, tokenizer) and verify its logits."""
    from keizoku.checkpoint.hf_export import ExportError
    from keizoku.checkpoint.hf_export import export as do_export
    from keizoku.config import ConfigError

    try:
        do_export(run_dir, out, step=step, verify=verify,
                  log=lambda m: console.print(m, highlight=False, markup=False, soft_wrap=True))
    except (ExportError, ConfigError, OSError) as e:
        _error(str(e))
        raise typer.Exit(1) from None


config_app = typer.Typer(help="Show and check keizoku configuration files.", no_args_is_help=True)
app.add_typer(config_app, name="config")


@config_app.command("defaults")
def config_defaults() -> None:
    """Print every setting with its default and help text, as a YAML file to start from."""
    from keizoku.config import defaults_yaml

    print(defaults_yaml(), end="")


@config_app.command("check")
def config_check(
    path: Annotated[Path, typer.Argument(help="A keizoku YAML config.", show_default=False)],
    overrides: Annotated[Optional[list[str]], typer.Argument(help="key.path=value overrides.", show_default=False)] = None,
) -> None:
    """Validate CONFIG with overrides, and print the resolved configuration."""
    from keizoku.config import to_yaml

    print(to_yaml(_load_config(path, overrides, exit_code=1)), end="")


def main() -> None:
    app(prog_name="keizoku")


if __name__ == "__main__":
    sys.exit(main())
