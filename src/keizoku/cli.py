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
    (checkpoint.resume: auto). Exit status: 0 done, 1 failed, 2 bad config, 3 stopped by SIGTERM/SIGUSR1/SIGUSR2
    after saving (resubmit to continue).
    """
    from keizoku.data.blend import DataError
    from keizoku.engines import run
    from keizoku.engines.megatron import MegatronError
    from keizoku.engines.torch.trainer import TrainingError
    from keizoku.train.model import ModelLoadError

    cfg = _load_config(config, overrides, exit_code=2)
    try:
        status = run(cfg)
    except (TrainingError, DataError, ModelLoadError, MegatronError, NotImplementedError) as e:
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
    """Write a checkpoint as a Hugging Face model (safetensors, config, tokenizer) and verify its logits.

    Runs of engine: megatron are exported through Megatron-Bridge (AutoBridge) from what keizoku recorded in
    the run directory; they need Megatron-Bridge installed (the NeMo container).
    """
    from keizoku.checkpoint.hf_export import ExportError
    from keizoku.checkpoint.hf_export import export as do_export
    from keizoku.config import ConfigError, load
    from keizoku.engines.megatron import MegatronError

    try:
        if load(run_dir / "config.yaml").engine == "megatron":
            from keizoku.engines.megatron.export import export as do_export  # noqa: F811 - the megatron run's
        do_export(run_dir, out, step=step, verify=verify,
                  log=lambda m: console.print(m, highlight=False, markup=False, soft_wrap=True))
    except (ExportError, ConfigError, MegatronError, OSError) as e:
        _error(str(e))
        raise typer.Exit(1) from None


convert_app = typer.Typer(help="Convert checkpoints between Hugging Face and engine formats.", no_args_is_help=True)
app.add_typer(convert_app, name="convert")


class ConvertEngine(str, Enum):
    megatron = "megatron"


@convert_app.command("import")
def convert_import(
    hf_path: Annotated[str, typer.Argument(help="A local Hugging Face checkpoint directory.", show_default=False)],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Directory for the Megatron checkpoint.",
                                                show_default=False)] = None,
    import_dir: Annotated[Optional[Path], typer.Option(
        help="Instead of --out: the cache directory that runs with megatron.import_dir: DIR look in (the "
        "import lands in its subdirectory for this checkpoint's fingerprint and Bridge release).")] = None,
    engine: Annotated[ConvertEngine, typer.Option(help="Target format.")] = ConvertEngine.megatron,
    transformer_impl: Annotated[str, typer.Option(
        help="transformer_engine, or local (Megatron-Core's own layers, where Transformer Engine is missing); "
        "the checkpoint loads into either.")] = "transformer_engine",
    tokenizer: Annotated[Optional[str], typer.Option(help="Tokenizer recorded with the checkpoint "
                                                          "(default: the HF checkpoint's).")] = None,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help="Allow model code from the "
                                                                                "checkpoint.")] = False,
) -> None:
    """Import a Hugging Face checkpoint to Megatron format (torch_dist) with Megatron-Bridge; one GPU.

    keizoku train does this itself on the first run of engine: megatron (cached by the checkpoint's
    fingerprint); run it by hand to prepare a shared import (megatron.import_dir) before submitting jobs.
    """
    from keizoku.engines.megatron import MegatronError, versions
    from keizoku.engines.megatron.importer import cache_dir, fingerprint, import_hf

    if (out is None) == (import_dir is None):
        _error("give --out DIR or --import-dir DIR")
        raise typer.Exit(2)
    try:
        if import_dir is not None:
            out = cache_dir(import_dir, fingerprint(hf_path), versions.detect().release)
        import_hf(hf_path, out, transformer_impl=transformer_impl, trust_remote_code=trust_remote_code,
                  tokenizer=tokenizer, log=lambda m: console.print(m, highlight=False, markup=False, soft_wrap=True))
    except MegatronError as e:
        _error(str(e))
        raise typer.Exit(1) from None


def _launch_profile(name: Optional[str], sets: Optional[list[str]]):
    from keizoku.launch.profile import ProfileError, load

    try:
        return load(name, sets or []) if name else None
    except ProfileError as e:
        for line in str(e).splitlines():
            _error(line)
        raise typer.Exit(2) from None


@app.command()
def launch(
    config: Annotated[Path, typer.Argument(help="A keizoku YAML config.", show_default=False)],
    overrides: Annotated[Optional[list[str]], typer.Argument(help="key.path=value overrides.", show_default=False)] = None,
    profile: Annotated[Optional[str], typer.Option("--profile", "-p", help="Site profile (name or YAML file) for "
                                                   "the launcher, starter, environment; default: by scheduler.")] = None,
    starter: Annotated[Optional[str], typer.Option(help="srun, mpirun, pbsdsh, qrsh, ssh or local (default: srun "
                                                   "under Slurm, qrsh under Grid Engine, pbsdsh under PBS).")] = None,
    launcher: Annotated[Optional[str], typer.Option(help="node (an agent per node) or mpi (a process per GPU "
                                                    "from the starter).")] = None,
    nproc_per_node: Annotated[int, typer.Option(help="Training processes per node (0: one per visible GPU, or 1).")] = 0,
) -> None:
    """Run training on the nodes of the current allocation (inside a qsub/sbatch job, or on this machine).

    Reads the scheduler's variables (Grid Engine PE_HOSTFILE, PBS_NODEFILE, SLURM_JOB_NODELIST; none: this
    machine), picks the rendezvous (this host, a port no other job here holds), starts one agent per node
    (srun, mpirun, pbsdsh, qrsh -inherit, ssh) that starts a training process per GPU, relays the
    walltime warning (SIGUSR1/SIGUSR2/SIGTERM: save and exit 3) and stops every node if one fails. Exits at
    once with 0 when the run is already complete. Started as one of several tasks by mpirun or srun, it is
    one training process: ranks from OMPI_COMM_WORLD_*, PMI_*, SLURM_PROCID, ...

    Exit status: 0 done, 1 failed (or the failed rank's status), 2 bad config, 3 stopped after saving.
    """
    from keizoku.launch.allocation import AllocationError, detect
    from keizoku.launch.driver import LaunchError, Plan
    from keizoku.launch.driver import launch as run_launch
    from keizoku.launch.port import PortError
    from keizoku.launch.progress import total_steps
    from keizoku.launch.ranks import RankError, from_env

    try:
        in_mpi = from_env(os.environ) is not None
    except RankError as e:
        _error(str(e))
        raise typer.Exit(2) from None
    if in_mpi:  # one rank of a user's `mpirun ... keizoku launch CONFIG`
        from keizoku.launch.worker import exec_train

        exec_train([str(config), *(overrides or [])])
    cfg = _load_config(config, overrides, exit_code=2)
    prof = _launch_profile(profile, None)
    try:
        scheduler = detect().scheduler
        default_starter = {"slurm": "srun", "gridengine": "qrsh", "pbs": "pbsdsh"}.get(scheduler, "local")
        plan = Plan(train_args=[str(config), *(overrides or [])], run_dir=str(Path(cfg.run_dir).resolve()),
                    total_steps=total_steps(cfg), workdir=os.getcwd(),
                    launcher=launcher or (prof.launcher if prof else "node"),
                    starter=starter or (prof.starter if prof and prof.scheduler == scheduler else default_starter),
                    procs_per_node=nproc_per_node or (prof.procs_per_node or prof.gpus_per_node if prof else 0))
        if prof:
            plan.env, plan.mpirun, plan.failure_grace_s = dict(prof.env), list(prof.mpirun), prof.failure_grace_s
        status = run_launch(plan)
    except (LaunchError, AllocationError, PortError) as e:
        _error(str(e))
        raise typer.Exit(2) from None
    raise typer.Exit(status)


@app.command()
def submit(
    config: Annotated[Path, typer.Argument(help="A keizoku YAML config.", show_default=False)],
    overrides: Annotated[Optional[list[str]], typer.Argument(help="key.path=value overrides.", show_default=False)] = None,
    profile: Annotated[str, typer.Option("--profile", "-p", help="Site profile: tsubame4, abci3, slurm, local, "
                                         "one of yours (~/.config/keizoku/profiles/NAME.yaml) or a YAML file.",
                                         show_default=False)] = ...,
    nodes: Annotated[Optional[int], typer.Option("--nodes", "-N", help="Nodes per job.", min=1)] = None,
    walltime: Annotated[Optional[str], typer.Option("--walltime", "-t", help="Time limit per job, HH:MM:SS.")] = None,
    chain: Annotated[int, typer.Option(help="Submit K jobs, each waiting for the previous one (afterany) and "
                                       "resuming from the newest checkpoint; spare ones exit at once.", min=1)] = 1,
    container: Annotated[Optional[Path], typer.Option(help="Run training in this Apptainer image (.sif): "
                                                      "apptainer exec --nv -B ... IMAGE.")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a profile setting: key=value "
                                                      "(e.g. group=tga12345, queue=gpu, env.NCCL_DEBUG=INFO).")] = None,
    name: Annotated[Optional[str], typer.Option(help="Job name (default: keizoku-RUN_DIR_NAME).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the job script and the submit commands; "
                                          "write and submit nothing.")] = False,
) -> None:
    """Write a job script for a site profile into the run directory and submit it (a chain with --chain).

    The script asks for the scheduler's walltime warning (Grid Engine -notify, Slurm --signal), runs
    `keizoku launch` on the job's nodes, and records job ids in RUN_DIR/jobs.jsonl (see keizoku status).
    Profiles are YAML: copy a shipped one to ~/.config/keizoku/profiles/ or write one with base: NAME.
    """
    import shlex

    from keizoku.config import ConfigError
    from keizoku.launch.profile import ProfileError
    from keizoku.launch.submit import SubmitError
    from keizoku.launch.submit import submit as do_submit

    cfg = _load_config(config, overrides, exit_code=2)
    sets = list(set_ or []) + ([f"nodes={nodes}"] if nodes else []) + ([f"walltime={walltime}"] if walltime else [])
    prof = _launch_profile(profile, sets)
    try:
        result = do_submit(cfg, config, list(overrides or []), prof, chain=chain, container=container,
                           dry_run=dry_run, name=name, command=shlex.join(["keizoku", "submit", *sys.argv[2:]]),
                           log=lambda m: console.print(m, highlight=False, markup=False, soft_wrap=True))
    except (SubmitError, ProfileError, ConfigError, ValueError, OSError) as e:
        _error(str(e))
        raise typer.Exit(1) from None
    if dry_run:
        print(f"# {result.script} (dry run: not written)\n{result.script_text}# would run:")
        for cmd in result.commands:
            print(f"#   {shlex.join(cmd)}")
        return
    console.print(f"job script {result.script}; follow with: keizoku status {Path(cfg.run_dir)}",
                  highlight=False, markup=False, soft_wrap=True)
    if result.job_ids and prof.scheduler != "local":
        print(" ".join(result.job_ids))


@app.command()
def status(
    run_dir: Annotated[Path, typer.Argument(help="A keizoku run directory.", show_default=False)],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """Jobs of a run and their states, the last step, loss and tokens, and the newest checkpoint."""
    import json

    from keizoku.launch.progress import status as run_status

    if not run_dir.is_dir():
        _error(f"{run_dir}: no such run directory")
        raise typer.Exit(1)
    s = run_status(run_dir)
    if as_json:
        print(json.dumps(s.to_dict(), indent=1))
        return
    table = Table(title=f"{run_dir} — jobs ({s.scheduler or 'none recorded'})", title_justify="left")
    for col in ("job", "chain", "state", "exit", "hosts", "detail"):
        table.add_column(col, overflow="fold")
    for j in s.jobs:
        table.add_row(j.job_id, f"{j.link}/{j.of}" if j.link else "", j.state,
                      "" if j.exit_status is None else str(j.exit_status), ",".join(j.hosts[:4]), j.detail)
    out.print(table)
    if s.last:
        total = f" of {s.total_steps}" if s.total_steps else ""
        out.print(f"step {s.last['step']}{total} · loss {s.last['loss']:.4f} · tokens {s.last['tokens']:,}",
                  highlight=False)
    else:
        out.print("no training step recorded yet", highlight=False)
    out.print(f"latest checkpoint: {s.checkpoint or 'none'}", highlight=False, soft_wrap=True)


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
