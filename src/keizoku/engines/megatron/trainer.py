"""The megatron engine: the keizoku config trained by Megatron-Bridge's ``pretrain``.

Reads top to bottom: check the installed Bridge/Core pair and the config against the world size, write the
resolved config and what export needs (``RUN_DIR/megatron.json``), make sure the HF weights are imported to
Megatron format (cached by fingerprint; skipped once the run has its own checkpoint), build the provider and
the ``ConfigContainer`` (``plan.py`` → ``container.py``), relay SIGUSR1/SIGUSR2 to Bridge's SIGTERM handler,
and call ``pretrain`` with Bridge's GPT forward step and keizoku's callbacks (``reporting.py``: metrics.jsonl,
evaluation of every validation set). Started like the torch engine: ``keizoku train`` for
one GPU, ``torchrun … -m keizoku train`` (or ``keizoku launch``) for many.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from keizoku import downstream, preflight
from keizoku.config import KeizokuConfig, save_resolved, validate
from keizoku.engines.megatron import MegatronError
from keizoku.rundir import ExitCode, RunDir, keep_megatron_checkpoint, latest_checkpoint, write_atomic
from keizoku.data import blend
from keizoku.schedule import Segment, run_length, run_plan, write_plan


class MegatronTrainingError(MegatronError):
    pass


SINGLE_PROCESS_ENV = "KEIZOKU_MEGATRON_SINGLE_PROCESS"  # set up as one process by keizoku, not by a launcher


def train(cfg: KeizokuConfig, allow_changes: bool = False) -> int:
    from keizoku.engines.megatron import plan, reporting

    found = _supported_bridge()
    rank, world = _process_ranks()
    run_plan_ = run_plan(cfg)
    # phases and extensions: each is its own Bridge run from the last one's checkpoint (plan.py)
    phased = len(run_plan_.segments) > 1 or run_plan_.segments[0].kind != "run"
    # Bridge >= 0.3 has callbacks: keizoku evaluates every validation set itself and writes metrics.jsonl;
    # Bridge 0.2 has none: Bridge's own validation of the one set, metrics in its logs/TensorBoard only
    callbacks = plan.has_callbacks(found.release)
    relay = reporting.WalltimeRelay(deferrable=callbacks, log=print if rank == 0 else lambda msg: None)  # from here on
    errors = validate(cfg, world_size=world)
    errors = errors or preflight.problems(cfg)  # every rank: small files only; before the run directory is made
    if errors:
        if rank == 0:
            print("\n".join(f"error: {e}" for e in errors), file=sys.stderr, flush=True)
        return ExitCode.CONFIG
    missing = missing_packages(cfg)
    if missing:
        raise MegatronTrainingError(missing)
    run_dir, length = Path(cfg.run_dir).absolute(), run_length(cfg)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_resolved(cfg, run_dir, allow_changes=allow_changes, has_trained=_saved_step(run_dir) is not None)
        print(f"keizoku: engine megatron — {found}; world {world}, data-parallel "
              f"{plan.data_parallel_size(cfg, world)}; {length.steps} steps", flush=True)
    saved = _saved_step(run_dir) if cfg.checkpoint.resume == "auto" else None
    if saved is not None and saved >= length.steps:  # Bridge would stop with "no samples left to consume"
        if rank == 0:
            print(f"keizoku: training is complete ({saved} of {length.steps} steps)", flush=True)
        return ExitCode.OK
    own_checkpoint = saved is not None or cfg.checkpoint.resume not in ("auto", "none")
    pretrained = None if own_checkpoint else _pretrained_checkpoint(cfg, run_dir, found.release, rank)
    segment = run_plan_.segment_at(saved or 0) if phased else None
    run_cfg = cfg if segment is None else _segment_config(cfg, segment)
    tokens = length.tokens if segment is None else segment.steps * cfg.train.global_batch_size * cfg.data.seq_length
    train_blend, valid_blend = _blends(run_cfg, tokens, found, evaluated_by_keizoku=callbacks,
                                       key="data.blend" if segment is None else segment.blend_key)
    p = plan.plan_megatron(run_cfg, release=found.release, world_size=world, train_blend=train_blend,
                           valid_blend=valid_blend, pretrained_checkpoint=pretrained, segment=segment)
    if rank == 0:
        _write_run_info(run_dir, cfg, found, p)
        if segment is not None:
            for seg in run_plan_.segments:
                print(f"keizoku: {seg.describe(cfg.train.global_batch_size * cfg.data.seq_length)}", flush=True)
            write_plan(run_plan_, run_dir, cfg.train.global_batch_size * cfg.data.seq_length)
            print(f"keizoku: this Megatron-Bridge run trains {segment.kind} {segment.name} (steps "
                  f"{max(saved or 0, segment.first_step) + 1}-{segment.end_step})", flush=True)
    reporter = reporting.Reporter(run_cfg, length.steps if segment is None else segment.end_step, relay,
                                  phase=None if segment is None else segment.name) if callbacks else None
    _pretrain(cfg, p, reporter)
    done = _saved_step(run_dir)
    if rank == 0 and done is not None and cfg.eval.downstream.tasks:  # the checkpoint this Bridge run ended on
        downstream.after_checkpoint(cfg, run_dir, done)
    if segment is not None and done == segment.end_step:
        if rank == 0:
            kept = keep_megatron_checkpoint(run_dir, done, f"the end of {segment.kind} {segment.name}")
            print(f"keizoku: {segment.kind} {segment.name} is complete; its last checkpoint is kept: {kept}", flush=True)
        if done < length.steps:
            return _next_segment(run_plan_.segment_at(done), rank)
    if done is not None and done < length.steps:
        if rank == 0:
            print(f"keizoku: stopped at step {done} of {length.steps} after saving; resubmit to continue", flush=True)
        return ExitCode.STOPPED
    return ExitCode.OK


def _segment_config(cfg: KeizokuConfig, segment: Segment) -> KeizokuConfig:
    """The config one Bridge run of a phase or extension trains: the segment's blend and validation sets."""
    from dataclasses import replace

    return replace(cfg, data=blend.segment_data(cfg, segment))


def _next_segment(segment: Segment, rank: int) -> int:
    """After a phase: the next one is its own Bridge run, in a fresh process (Bridge sets up Megatron's global state
    once a process). One process that keizoku set up itself starts it at once (exec: same process id, same command
    line); processes of a launcher (torchrun, keizoku launch/submit) stop with STOPPED, which a submit chain's next
    job resumes."""
    if os.environ.get(SINGLE_PROCESS_ENV) == "1":
        print(f"keizoku: starting {segment.kind} {segment.name} as its own Megatron-Bridge run", flush=True)
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, [sys.executable, "-m", "keizoku", *sys.argv[1:]])
    if rank == 0:
        print(f"keizoku: {segment.kind} {segment.name} is next, as its own Megatron-Bridge run: run again (a keizoku "
              "submit chain's next job does)", flush=True)
    return ExitCode.STOPPED


def _supported_bridge():
    """The installed Bridge/Core pair, if keizoku drives it and a GPU is there to run it."""
    import torch

    from keizoku.engines.megatron import versions

    try:
        found = versions.detect()
    except versions.VersionError as e:
        raise MegatronTrainingError(str(e)) from None
    if not torch.cuda.is_available():
        raise MegatronTrainingError("engine: megatron needs CUDA GPUs and none is visible here (engine: torch "
                                    "trains on a CPU)")
    return found


def _process_ranks() -> tuple[int, int]:
    """(rank, world size): torchrun's or keizoku launch's, or a one-process group's (Bridge initialises from env://)."""
    from keizoku.engines.megatron import importer

    if "RANK" not in os.environ or os.environ.get(SINGLE_PROCESS_ENV) == "1":
        importer.single_process_env()
        os.environ[SINGLE_PROCESS_ENV] = "1"  # kept through the exec into a phase's own process (_next_segment)
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def _pretrained_checkpoint(cfg: KeizokuConfig, run_dir: Path, release: str, rank: int) -> str | None:
    """The Megatron import of model.hf_path to start from (made now if it is not cached), or None for init: random."""
    from keizoku.engines.megatron import importer

    if cfg.model.init == "random":
        if rank == 0:
            print("keizoku: training from random weights (model.init: random)", flush=True)
        return None
    root = Path(cfg.megatron.import_dir or RunDir(run_dir).megatron_import).absolute()
    try:
        pretrained = str(importer.ensure_import(
            cfg.model.hf_path, root, release, rank=rank, transformer_impl=cfg.megatron.transformer_impl,
            trust_remote_code=cfg.model.trust_remote_code, tokenizer=cfg.model.tokenizer))
    except importer.ImportError_ as e:
        raise MegatronTrainingError(str(e)) from None
    if rank == 0:
        print(f"keizoku: starting from the pretrained weights of {cfg.model.hf_path} ({pretrained})", flush=True)
    return pretrained


def _blends(cfg: KeizokuConfig, total_tokens: int, found, evaluated_by_keizoku: bool, key: str = "data.blend"):
    """(train blend, validation blend) in Megatron's form; the validation blend is Bridge's to evaluate only where
    keizoku cannot (Bridge 0.2, one set)."""
    if len(cfg.data.validation) > 1 and not evaluated_by_keizoku:
        raise MegatronTrainingError(
            f"data.validation: {found} evaluates one validation set, not {len(cfg.data.validation)} "
            f"({', '.join(cfg.data.validation)}); keep one, or use Megatron-Bridge 0.3 or newer")
    if cfg.data.mock:
        return None, None
    train_blend = blend.blend_of(blend.resolve(cfg.data.blend, key), total_tokens, key)
    valid_blend = None
    for name, entries in cfg.data.validation.items():
        valid_blend = blend.blend_of(blend.resolve(entries, f"data.validation.{name}"), None)
    return train_blend, None if evaluated_by_keizoku else valid_blend


def _pretrain(cfg: KeizokuConfig, p: dict, reporter) -> None:
    """Bridge's ``pretrain`` on the plan, with keizoku's callbacks where the release has them."""
    from megatron.bridge.training.gpt_step import forward_step
    from megatron.bridge.training.pretrain import pretrain

    from keizoku.engines.megatron import container

    bridge = container.hf_bridge(cfg.model.hf_path, cfg.model.trust_remote_code)
    provider = bridge.to_megatron_provider(load_weights=False)  # weights: the import, or the run's checkpoint
    config = container.build(p, provider)
    extra = {}
    if reporter is not None:
        from megatron.bridge.training.callbacks import CallbackManager

        manager = CallbackManager()
        reporter.register(manager)
        extra["callbacks"] = manager
    try:
        pretrain(config, forward_step, **extra)
    except SystemExit as e:  # Bridge leaves through sys.exit after an exit signal or train.exit_interval
        if e.code not in (0, None):
            raise MegatronTrainingError(f"Megatron-Bridge stopped with exit status {e.code}") from None


def missing_packages(cfg: KeizokuConfig) -> str | None:
    """What this configuration needs beyond Megatron-Core and is not installed here (None: nothing)."""
    import importlib.util

    if cfg.megatron.sequence_parallel and cfg.megatron.transformer_impl == "local" and \
            importlib.util.find_spec("apex") is None:
        # the local layer spec's norm is then torch's, which asserts sequence_parallel is off
        # (megatron/core/transformer/torch_norm.py); with Apex it is FusedLayerNorm, which supports it
        return ("megatron.sequence_parallel: with megatron.transformer_impl: local it needs Apex (Megatron-Core's "
                "FusedLayerNorm), which is not installed; use transformer_impl: transformer_engine or "
                "sequence_parallel: false")
    if cfg.optim.state_dtype == "bf16" and importlib.util.find_spec("transformer_engine") is None:
        # Megatron-Core's own check fails with a TypeError when TE is absent (megatron/core/utils.py)
        return ("optim.state_dtype: bf16 with engine: megatron needs Transformer Engine (its FusedAdam keeps the "
                "moments in bf16), which is not installed; run inside the NeMo container or use optim.state_dtype: "
                "fp32")
    return None


def _saved_step(run_dir: Path) -> int | None:
    """The step of the run's newest complete Megatron checkpoint (``keizoku.rundir``), if any."""
    saved = latest_checkpoint(run_dir, engine="megatron")
    return None if saved is None else saved.step


def _write_run_info(run_dir: Path, cfg: KeizokuConfig, found, p: dict) -> None:
    """What ``keizoku export`` needs besides config.yaml (Bridge's own export reads run_config.yaml instead)."""
    from keizoku.engines.megatron.importer import fingerprint

    info = {"bridge": list(found.bridge), "core": list(found.core), "hf_path": str(Path(cfg.model.hf_path).absolute()),
            "hf_fingerprint": fingerprint(cfg.model.hf_path), "tokenizer": p["tokenizer"]["tokenizer_model"],
            "transformer_impl": cfg.megatron.transformer_impl, "train_iters": p["train"]["train_iters"],
            "pretrained_checkpoint": p["checkpoint"]["pretrained_checkpoint"], "plan": p}
    write_atomic(RunDir(run_dir).megatron_info, json.dumps(info, indent=1, default=str) + "\n")
