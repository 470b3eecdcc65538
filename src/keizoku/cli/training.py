"""``keizoku quickstart``, ``train``, ``export``, ``convert import`` and ``config``: training and its artifacts."""

from __future__ import annotations

import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from keizoku.cli.app import app, error, leave, load_config_or_exit, log
from keizoku.cli.app import out as stdout
from keizoku.errors import KeizokuError
from keizoku.rundir import ExitCode, RunDir


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
    from keizoku.quiet import silence_library_noise

    silence_library_noise()
    from keizoku.quickstart import Options, run_quickstart

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never wait on the hub
    try:
        run_quickstart(Options(out=out_dir, steps=steps, base_steps=base_steps, force=force), console=stdout)
    except (KeizokuError, OSError) as e:
        error(str(e))
        leave(ExitCode.FAILED)
    leave(ExitCode.OK)  # as after train: gloo threads


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="A keizoku YAML config (see keizoku config defaults).",
                                           show_default=False)],
    overrides: Annotated[Optional[list[str]], typer.Argument(help="key.path=value overrides.", show_default=False)] = None,
    allow_changes: Annotated[bool, typer.Option(
        "--allow-changes", help="Let a run that has trained change what it trains (data, batch, length, optimizer, "
                                "schedule...); refused otherwise. Each start is recorded in RUN_DIR/config-history.jsonl."
    )] = False,
    verbose: Annotated[bool, typer.Option("--verbose", help="Also show the libraries' start-up warnings (hidden: "
                                                            "keizoku.quiet lists them).")] = False,
) -> None:
    """Continual pre-training from a Hugging Face model on tokenized datasets.

    One process on a laptop, or under torchrun on many GPUs and nodes:
    torchrun --nproc-per-node 8 -m keizoku train CONFIG.yaml. Resumes from the run's latest checkpoint
    (checkpoint.resume: auto). Ctrl-C saves and stops at the end of the step; a second Ctrl-C aborts. Exit status:
    0 done, 1 failed, 2 bad config, 3 stopped after saving by Ctrl-C or SIGTERM/SIGUSR1/SIGUSR2 (run again to
    continue), 130 aborted by a second Ctrl-C.
    """
    if not verbose:
        from keizoku.quiet import silence_library_noise

        silence_library_noise()
    from keizoku.engines import train as train_with_engine

    cfg = load_config_or_exit(config, overrides)
    try:
        status = train_with_engine(cfg, allow_changes=allow_changes)
    except KeizokuError as e:
        error(str(e))
        status = ExitCode.FAILED
    except KeyboardInterrupt:
        error("aborted by a second Ctrl-C: nothing saved since the last checkpoint, which is intact; run again to "
              "resume from it")
        status = ExitCode.INTERRUPTED
    leave(status)


class Decay(str, Enum):
    constant = "constant"
    linear = "linear"
    cosine = "cosine"


@app.command()
def extend(
    run_dir: Annotated[Path, typer.Argument(help="The run directory to extend (a run that has trained).",
                                            show_default=False)],
    steps: Annotated[Optional[int], typer.Option("--steps", help="Optimizer steps to add after the run's end.",
                                                 show_default=False)] = None,
    tokens: Annotated[Optional[int], typer.Option("--tokens", help="Tokens to add (whole global batches).",
                                                  show_default=False)] = None,
    rewarm_steps: Annotated[int, typer.Option("--rewarm-steps", help="Re-warm: climb linearly from the rate where the "
                                                                     "run is to --lr over this many steps, then "
                                                                     "decay. 0: continue the decay from where the "
                                                                     "rate is.")] = 0,
    lr: Annotated[Optional[float], typer.Option("--lr", help="The re-warm's peak (default: optim.lr).",
                                                show_default=False)] = None,
    min_lr: Annotated[Optional[float], typer.Option("--min-lr", help="Where the decay ends, at the extension's last "
                                                                     "step (default: optim.min_lr).",
                                                    show_default=False)] = None,
    decay: Annotated[Optional[Decay], typer.Option("--decay", help="The rate after the re-warm, or from where it is "
                                                                   "(default: cosine after a re-warm; else the shape "
                                                                   "the run ended with).", show_default=False)] = None,
    name: Annotated[Optional[str], typer.Option("--name", help="The extension's name in metrics and checkpoints "
                                                               "(default: extension-K).", show_default=False)] = None,
    blend: Annotated[Optional[str], typer.Option("--blend", help="Its training data, as data.blend in YAML, e.g. "
                                                                "'[{path: tokenized/new, weight: 1}]' (default: "
                                                                "what the run ended on).", show_default=False)] = None,
) -> None:
    """Train a run past its end, explicitly: append an extension to its schedule (recorded in the run's config.yaml
    and config-history.jsonl), print and plot the whole schedule; then train as before to run it.

    The steps already trained keep their rates. Continue the decay from where the rate is (the default), or re-warm
    to a new peak (Ibrahim et al. 2024): keizoku extend RUN_DIR --steps 2000 --rewarm-steps 100 --lr 1e-4.
    """
    from keizoku.config import ConfigError
    from keizoku.extension import extend as extend_run

    entries = None
    if blend is not None:
        entries = _blend_option(blend)
    try:
        done = extend_run(run_dir, steps=steps, tokens=tokens, rewarm_steps=rewarm_steps, lr=lr, min_lr=min_lr,
                          decay=decay.value if decay else None, name=name, blend=entries, argv=sys.argv[1:])
    except ConfigError as e:
        for line in str(e).splitlines():
            error(line)
        leave(ExitCode.CONFIG)
    except KeizokuError as e:
        error(str(e))
        leave(ExitCode.CONFIG)
    per_step = done.cfg.train.global_batch_size * done.cfg.data.seq_length
    lines = [f"keizoku: {run_dir}: extended by {done.extension.name}; the run's schedule is now:"]
    lines += [f"  {seg.describe(per_step)}" for seg in done.plan.segments]
    if done.kept is not None:
        lines.append(f"  kept: {done.kept} (the run's end)")
    lines += [f"  plotted: {done.plot}", f"  recorded: {RunDir(run_dir).history}",
              f"continue with: keizoku train CONFIG (or {RunDir(run_dir).config}), as before"]
    for line in lines:
        stdout.print(line, highlight=False, markup=False, soft_wrap=True)
    leave(ExitCode.OK)


def _blend_option(text: str):
    """--blend YAML → dataset entries, or a one-line error and exit 2."""
    import yaml
    from omegaconf import OmegaConf

    from keizoku.config import DatasetEntry

    try:
        items = yaml.safe_load(text)
        if not isinstance(items, list) or not items:
            raise ValueError("expected a list such as '[{path: tokenized/new, weight: 1}]'")
        return [OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DatasetEntry), item)) for item in items]
    except Exception as e:  # YAML, the shape, an unknown key: all one message
        error(f"--blend {text}: {' '.join(str(e).split())[:300]}")
        leave(ExitCode.CONFIG)


class ExportDtype(str, Enum):
    auto = "auto"
    bf16 = "bf16"
    fp16 = "fp16"
    fp32 = "fp32"


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="A keizoku run directory.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the Hugging Face model.", show_default=False)],
    step: Annotated[Optional[int], typer.Option(help="Checkpoint step (default: the latest).")] = None,
    dtype: Annotated[ExportDtype, typer.Option(help="Dtype of the exported weights; auto: the base model's (its "
                                                    "config.json's dtype, fp32 if it names none).")] = ExportDtype.auto,
    verify: Annotated[bool, typer.Option(help="Before publishing, read every exported tensor back and check it "
                                              "equals the checkpoint's (and the logits: --verify-logits).")] = True,
    verify_logits: Annotated[Optional[bool], typer.Option(
        "--verify-logits/--no-verify-logits", show_default=False,
        help="Also load the export with transformers and check it reproduces the checkpoint's logits (holds the "
             "model in fp32 in memory). Default: on for models of at most 1.5B parameters.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an earlier keizoku export at --out (nothing "
                                                                "else is ever replaced).")] = False,
) -> None:
    """Write a checkpoint as a Hugging Face model (safetensors, config, tokenizer), verified.

    Engine torch streams it a slice at a time (never a whole tensor in memory), reads every slice back to check
    it, and needs no model.hf_path (the run keeps a copy of the base model's config and tokenizer in
    RUN_DIR/base-model). --out must be new or empty, or an earlier export with --overwrite. Runs of
    engine: megatron are exported through Megatron-Bridge (AutoBridge) from what keizoku recorded in the run
    directory; they need Megatron-Bridge installed (the NeMo container).
    """
    from keizoku.engines import export as export_with_engine

    try:
        export_with_engine(run_dir, out, step=step, verify=verify, log=log, dtype=dtype.value,
                           verify_logits=verify_logits, overwrite=overwrite)
    except (KeizokuError, OSError) as e:
        error(str(e))
        raise typer.Exit(ExitCode.FAILED) from None


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
    from keizoku.engines import import_hf

    if (out is None) == (import_dir is None):
        error("give --out DIR or --import-dir DIR")
        raise typer.Exit(ExitCode.CONFIG)
    try:
        import_hf(engine.value, hf_path, out=out, import_dir=import_dir, transformer_impl=transformer_impl,
                  trust_remote_code=trust_remote_code, tokenizer=tokenizer, log=log)
    except KeizokuError as e:
        error(str(e))
        raise typer.Exit(ExitCode.FAILED) from None


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
    inputs: Annotated[bool, typer.Option("--inputs/--no-inputs", help="Also check what the config names, as train "
                                         "does before it starts: the model and tokenizer, every dataset, their "
                                         "vocabulary and tokenizer against the model's. --no-inputs: the settings "
                                         "only (a config for another machine).")] = True,
) -> None:
    """Validate CONFIG with overrides and the inputs it names, and print the resolved configuration.

    Each problem is one line naming the file's line and key (FILE:LINE:COL: key: ...), the override
    (override key.path=value: ...) or the setting. Exit status: 0 valid, 1 not valid (keizoku train exits 2 on the
    same problems).
    """
    from keizoku.config import to_yaml
    from keizoku.preflight import problems as preflight_problems

    cfg = load_config_or_exit(path, overrides, exit_code=ExitCode.FAILED)
    problems = preflight_problems(cfg) if inputs else []
    for problem in problems:
        error(problem)
    if problems:
        raise typer.Exit(ExitCode.FAILED)
    print(to_yaml(cfg), end="")
    if cfg.phases or cfg.extensions:  # what the phases come to, as YAML comments (the output stays a config)
        from keizoku.schedule import run_plan

        per_step = cfg.train.global_batch_size * cfg.data.seq_length
        print("# the run, segment by segment:")
        for seg in run_plan(cfg).segments:
            print(f"#   {seg.describe(per_step)}")
