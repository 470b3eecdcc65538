"""keizoku's config → Megatron-Bridge's ``ConfigContainer`` fields, as plain data (no Bridge import here).

``plan_megatron`` returns ``{section: {field: value}}``: the sections are ConfigContainer's (``train``, ``validation``,
``optimizer``, ``ddp``, ``scheduler``, ``dataset``, ``logger``, ``tokenizer``, ``checkpoint``, ``rng``,
``dist``), plus ``model`` (attributes set on the provider that AutoBridge made from the HF config) and
``container`` (ConfigContainer's own fields). ``container.py`` turns it into Bridge's dataclasses. Keeping the
translation as data lets the tests check every field against each supported release's dataclasses, including
releases that cannot be imported on the test machine. A few values stand for objects: ``DTYPE:float32`` (a
torch dtype) and ``LAYER_SPEC:local`` (Bridge's ``local_layer_spec``).

What each keizoku setting becomes, and why where it is not obvious:

- Schedule: translated from keizoku's ``LRSchedule`` (``keizoku.schedule``), not recomputed. Megatron's scheduler
  gives step k (0-based) ``init + (lr − init)·k/W′`` during warmup, then decays from step W′ to
  ``lr_decay_iters``. keizoku's warmup gives ``lr·(k+1)/W`` and reaches ``min_lr`` exactly at its ``last_step``.
  ``W′ = W − 1`` and ``init = lr/W`` make the warmup identical step for step, and ``lr_decay_iters = last_step``
  ends the decay on the same step; a cosine then starts one step earlier than keizoku's (a difference of at most
  1/(steps − W) of the decay). WSD's anneal (``last_step − decay_start`` steps) and constant are identical.
- Precision: ``model.dtype: fp32`` trains in fp32 (no mixed precision); otherwise ``megatron.precision``
  picks Bridge's preset (bf16_mixed, or bf16 with an FP8 recipe).
- Evaluation: with Bridge >= 0.3 keizoku evaluates every validation set itself (``reporting.py``) and the
  trainer passes no validation blend, so Bridge's own validation is off. With Bridge 0.2 (no callbacks) Bridge
  evaluates the one set: ``eval_iters`` global batches, keizoku's ``eval.batches`` micro batches per
  data-parallel rank rounded up to whole global batches, no evaluation before step 1.
- ``model.router_aux_loss_coef``: ``moe_aux_loss_coeff`` (Megatron-Core computes and logs its load-balancing
  loss itself, per MoE layer; transformers pools the layers, so the two engines' values differ); unset, the
  coefficient the family's bridge sets (from transformers' ``router_aux_loss_coef`` for some families, e.g.
  OLMoE; a fixed default for others, e.g. Qwen3-MoE's 1e-3).
- Phases and extensions (``keizoku.schedule.run_plan``): each segment is its own Bridge run from the last one's
  checkpoint (``segment``): ``train_iters`` = the segment's end step, its blend with seed ``data.seed + index``
  (Bridge indexes its dataset from the run's consumed samples, as engine torch does), and its part of the
  schedule on Megatron's global step (``_segment_schedule``) with ``override_opt_param_scheduler`` so the
  checkpoint's scheduler settings give way to the segment's.
- Checkpoints: ``save = load = RUN_DIR/checkpoints`` so a rerun resumes; ``pretrained_checkpoint`` is the
  Megatron import of ``model.hf_path``, which Bridge loads (weights only, iteration 0) only while the run has
  no checkpoint of its own.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from keizoku.config import KeizokuConfig
from keizoku.data.blend import sample_cache_dir
from keizoku.rundir import RunDir
from keizoku.schedule import LRSchedule, Segment, run_length

FP8_PRESETS = {
    "tensorwise": "bf16_with_fp8_current_scaling_mixed",
    "delayed": "bf16_with_fp8_delayed_scaling_mixed",
    "mxfp8": "bf16_with_mxfp8_mixed",
    "blockwise": "bf16_with_fp8_subchannel_scaling_mixed",
}
# Bridge releases whose ConfigContainer has a ``validation`` section (eval settings left TrainingConfig there)
VALIDATION_SECTION_FROM = (0, 4)
# Bridge releases whose pretrain() takes callbacks (keizoku's metrics.jsonl and evaluation: reporting.py)
CALLBACKS_FROM = (0, 3)
# fusions that need Transformer Engine (or Apex) kernels; off with megatron.transformer_impl: local
TE_ONLY_FUSIONS = ("apply_rope_fusion", "gradient_accumulation_fusion", "masked_softmax_fusion",
                   "bias_activation_fusion", "bias_dropout_fusion", "persist_layer_norm", "cross_entropy_loss_fusion")

Blend = tuple[list[str], list[float] | None]


def has_callbacks(release: str) -> bool:
    return _at_least(release, CALLBACKS_FROM)


def data_parallel_size(cfg: KeizokuConfig, world_size: int) -> int:
    mg = cfg.megatron
    return world_size // (mg.tensor_parallel * mg.pipeline_parallel * mg.context_parallel)


def plan_megatron(cfg: KeizokuConfig, *, release: str, world_size: int, train_blend: Blend | None,
                  valid_blend: Blend | None, pretrained_checkpoint: str | None,
                  segment: Segment | None = None) -> dict[str, dict[str, Any]]:
    """Every Bridge field keizoku sets, by section. ``release`` is the Bridge release line ("0.2" … "0.6").
    ``segment``: the phase or extension this Bridge run trains (a run with ``phases:`` or extensions; the blends
    are then its own)."""
    steps = run_length(cfg).steps if segment is None else segment.end_step
    run = RunDir(Path(cfg.run_dir).absolute())
    out: dict[str, dict[str, Any]] = {
        "model": _model(cfg),
        "container": {"mixed_precision": _mixed_precision(cfg)},
        "train": {"micro_batch_size": cfg.train.micro_batch_size, "global_batch_size": cfg.train.global_batch_size,
                  "train_iters": steps,
                  "exit_signal_handler": True},  # SIGTERM (keizoku relays SIGUSR1/SIGUSR2 to it): save, then stop
        "optimizer": _optimizer(cfg) if segment is None else
        {**_optimizer(cfg), "lr": segment.schedule.lr, "min_lr": segment.schedule.min_lr},
        "ddp": {"use_distributed_optimizer": cfg.megatron.distributed_optimizer,
                "overlap_grad_reduce": cfg.megatron.overlap_grad_reduce,
                "overlap_param_gather": cfg.megatron.overlap_param_gather,
                "grad_reduce_in_fp32": True, "check_for_nan_in_grad": True},
        "scheduler": _schedule(LRSchedule.of(cfg.optim, cfg.schedule, steps), cfg.optim.weight_decay)
        if segment is None else _segment_schedule(segment, cfg.optim.weight_decay),
        "dataset": _dataset(cfg, train_blend, valid_blend, seed=None if segment is None else
                            cfg.data.seed + segment.index),
        "logger": _logger(cfg, run),
        "tokenizer": _tokenizer(cfg),
        "checkpoint": _checkpoint(cfg, run, pretrained_checkpoint),
        "rng": {"seed": cfg.train.seed},
        "dist": {"distributed_backend": "nccl"},
    }
    evaluation = _evaluation(cfg, steps, data_parallel_size(cfg, world_size), has_valid=valid_blend is not None)
    if _at_least(release, VALIDATION_SECTION_FROM):
        out["validation"] = evaluation
    else:
        out["train"].update(evaluation)
    for key, value in cfg.megatron.overrides.items():  # last: the user's word on fields keizoku does not name
        section, name = key.split(".", 1)
        if section == "train" and name in ("eval_iters", "eval_interval") and "validation" in out:
            section = "validation"
        out.setdefault(section, {})[name] = value
    return out


def _model(cfg: KeizokuConfig) -> dict[str, Any]:
    """Set on the provider that AutoBridge made from the HF config: parallelism, recompute, dtype."""
    mg, m = cfg.megatron, cfg.model
    model = {
        "tensor_model_parallel_size": mg.tensor_parallel,
        "pipeline_model_parallel_size": mg.pipeline_parallel,
        "virtual_pipeline_model_parallel_size": mg.virtual_pipeline,
        "context_parallel_size": mg.context_parallel,
        "sequence_parallel": mg.sequence_parallel,
        "expert_model_parallel_size": mg.expert_parallel,
        "seq_length": cfg.data.seq_length,
        **impl_settings(mg.transformer_impl),
    }
    if m.activation_checkpointing == "full":  # as engine: torch does: recompute every decoder layer
        model.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    elif m.activation_checkpointing == "selective":  # Megatron's own selective: core attention
        model.update(recompute_granularity="selective")
    elif m.full_recompute_layers:  # the first N layers (of each pipeline stage) recompute, the rest keep all
        model.update(recompute_granularity="full", recompute_method="block", recompute_num_layers=m.full_recompute_layers)
    if m.dtype == "fp32":
        model.update(bf16=False, fp16=False, params_dtype="DTYPE:float32", pipeline_dtype="DTYPE:float32",
                     autocast_dtype="DTYPE:float32")
    if m.router_aux_loss_coef is not None:  # Megatron-Core's own load-balancing loss, per MoE layer
        model.update(moe_aux_loss_coeff=m.router_aux_loss_coef)
    return model


def _mixed_precision(cfg: KeizokuConfig) -> str | None:
    if cfg.model.dtype == "fp32":
        return None
    return "bf16_mixed" if cfg.megatron.precision == "bf16" else FP8_PRESETS[cfg.megatron.fp8_recipe]


def _evaluation(cfg: KeizokuConfig, steps: int, dp: int, has_valid: bool) -> dict[str, Any]:
    """Bridge's own validation (Bridge 0.2 only; keizoku's Reporter evaluates otherwise): ``eval.batches`` micro
    batches per data-parallel rank, rounded up to whole global batches; off: an interval past the last step (Bridge
    0.2/0.3 divide by it)."""
    t = cfg.train
    eval_iters = math.ceil(cfg.eval.batches * t.micro_batch_size * dp / t.global_batch_size) if has_valid else 0
    return {"eval_iters": eval_iters,
            "eval_interval": cfg.eval.interval if has_valid and cfg.eval.interval else steps + 1}


def _optimizer(cfg: KeizokuConfig) -> dict[str, Any]:
    o = cfg.optim
    out = {
        "optimizer": "adam",  # Megatron's Adam is decoupled-weight-decay Adam (AdamW)
        "lr": o.lr, "min_lr": o.min_lr, "weight_decay": o.weight_decay,
        "adam_beta1": float(o.betas[0]), "adam_beta2": float(o.betas[1]), "adam_eps": o.eps,
        "clip_grad": o.grad_clip,  # 0: no clipping, as in keizoku
        "use_distributed_optimizer": cfg.megatron.distributed_optimizer,
    }
    if o.state_dtype == "bf16":  # Megatron's precision-aware optimizer (TE's FusedAdam) keeps the moments in bf16
        out.update(use_precision_aware_optimizer=True, exp_avg_dtype="DTYPE:bfloat16", exp_avg_sq_dtype="DTYPE:bfloat16")
    if cfg.model.dtype == "fp32":
        out.update(bf16=False, fp16=False, params_dtype="DTYPE:float32")
    return out


def _dataset(cfg: KeizokuConfig, train_blend: Blend | None, valid_blend: Blend | None,
             seed: int | None = None) -> dict[str, Any]:
    d = cfg.data
    dataset = {
        "random_seed": d.seed if seed is None else seed,
        "sequence_length": d.seq_length,
        "path_to_cache": str(sample_cache_dir(cfg)),
        # what keizoku.data.blend gives GPTDataset for engine: torch: the same samples in the same order
        "reset_position_ids": False, "reset_attention_mask": False, "eod_mask_loss": False,
        "create_attention_mask": False,
        "num_workers": d.num_workers, "persistent_workers": d.num_workers > 0, "pin_memory": True,
        "dataloader_type": "single", "data_sharding": True,
    }
    if not d.mock:
        dataset["blend_per_split"] = [_blend_value(train_blend), _blend_value(valid_blend), None]
        dataset["split"] = None
    return dataset


def _logger(cfg: KeizokuConfig, run: RunDir) -> dict[str, Any]:
    lg = cfg.logging
    return {
        "log_interval": lg.interval,
        "tensorboard_dir": str(run.tensorboard) if lg.tensorboard else None,
        "log_throughput": True,
        "log_validation_ppl_to_tensorboard": True,
        "wandb_project": (lg.wandb_project or "keizoku") if lg.wandb else None,
        "wandb_exp_name": run.path.name if lg.wandb else None,
        "wandb_save_dir": str(run.path / "wandb") if lg.wandb else None,
    }


def _tokenizer(cfg: KeizokuConfig) -> dict[str, Any]:
    out: dict[str, Any] = {"tokenizer_type": "HuggingFaceTokenizer",
                           "tokenizer_model": str(cfg.model.tokenizer or cfg.model.hf_path)}
    if cfg.model.trust_remote_code:  # only then: Bridge 0.2 release candidates have no such field
        out["hf_tokenizer_kwargs"] = {"trust_remote_code": True}
    return out


def _checkpoint(cfg: KeizokuConfig, run: RunDir, pretrained_checkpoint: str | None) -> dict[str, Any]:
    c = cfg.checkpoint
    save = str(run.checkpoints)
    return {
        "save": save,
        "load": save if c.resume == "auto" else None if c.resume == "none" else str(Path(c.resume).absolute()),
        "pretrained_checkpoint": pretrained_checkpoint,
        "save_interval": c.interval or None,  # None: only at the end
        "most_recent_k": c.keep_last,
        "ckpt_format": "torch_dist",
        "async_save": cfg.megatron.async_save,
        "save_optim": True, "save_rng": True,
        "exit_on_missing_checkpoint": c.resume not in ("auto", "none"),
    }


def impl_settings(transformer_impl: str) -> dict[str, Any]:
    """Provider fields for the layer implementation (also used by the import and the export)."""
    if transformer_impl != "local":
        return {"transformer_impl": transformer_impl}
    return {"transformer_impl": "local", "transformer_layer_spec": "LAYER_SPEC:local",
            "cross_entropy_fusion_impl": "native", **{name: False for name in TE_ONLY_FUSIONS}}


def _schedule(schedule: LRSchedule, weight_decay: float) -> dict[str, Any]:
    """Megatron's OptimizerParamScheduler settings for keizoku's schedule (see the module docstring)."""
    warmup = schedule.warmup_steps
    out: dict[str, Any] = {
        "lr_warmup_iters": max(warmup - 1, 0),
        "lr_warmup_init": schedule.lr / warmup if warmup else 0.0,
        "lr_decay_iters": max(schedule.last_step, 1),
        "start_weight_decay": weight_decay, "end_weight_decay": weight_decay,
        "weight_decay_incr_style": "constant",
    }
    if schedule.kind == "wsd":  # hold lr, then a linear anneal ending at the last step
        out.update(lr_decay_style="WSD", lr_wsd_decay_style="linear",
                   lr_wsd_decay_iters=max(schedule.last_step - schedule.decay_start, 1))
    else:
        out["lr_decay_style"] = schedule.kind  # cosine | constant
    return out


def _segment_schedule(segment: Segment, weight_decay: float) -> dict[str, Any]:
    """A segment's rates (first step F, warmup W from ``warmup_from`` to lr, then its decay to min_lr at its last
    step) on Megatron's global step, whose warmup always starts at step 0: this Bridge run trains only steps F on,
    so the warmup's line is placed to pass through the segment's: ``W′ = F + W − 1`` and ``init`` chosen on the same
    line (``lr/W`` when F = 0, as ``_schedule``); without a warmup, ``W′ = F`` and the decay starts at F. The decay
    ends at the segment's last step; after a warmup it starts one step earlier than keizoku's (as ``_schedule``'s
    cosine)."""
    s, first = segment.schedule, segment.first_step
    if s.warmup_steps:
        warmup_iters = first + s.warmup_steps - 1
        init = s.lr - (s.lr - s.warmup_from) * (first + s.warmup_steps - 1) / s.warmup_steps
    else:
        warmup_iters, init = first, 0.0
    return {"lr_warmup_iters": warmup_iters, "lr_warmup_init": init,
            "lr_decay_iters": max(first + s.last_step, warmup_iters + 1), "lr_decay_style": s.kind,
            "start_weight_decay": weight_decay, "end_weight_decay": weight_decay,
            "weight_decay_incr_style": "constant", "override_opt_param_scheduler": True}


def _blend_value(blend: Blend | None):
    if blend is None:
        return None
    prefixes, weights = blend
    return [list(prefixes), None if weights is None else [float(w) for w in weights]]


def _at_least(release: str, version: tuple[int, int]) -> bool:
    major, minor = (int(x) for x in release.split("."))
    return (major, minor) >= version


# the Bridge dataclass behind each plan section ("model" is the provider AutoBridge returns for the HF model)
SECTION_CLASSES = {
    "model": "GPTModelProvider", "train": "TrainingConfig", "validation": "ValidationConfig",
    "optimizer": "OptimizerConfig", "ddp": "DistributedDataParallelConfig", "scheduler": "SchedulerConfig",
    "dataset": "GPTDatasetConfig", "logger": "LoggerConfig", "tokenizer": "TokenizerConfig",
    "checkpoint": "CheckpointConfig", "rng": "RNGConfig", "dist": "DistributedInitConfig",
    "container": "ConfigContainer",
}


def section_class(p: dict[str, dict[str, Any]], section: str) -> str:
    if section == "dataset" and "blend_per_split" not in p["dataset"]:
        return "MockGPTDatasetConfig"  # data.mock: true, asked for explicitly
    return SECTION_CLASSES[section]


def unknown_fields(p: dict[str, dict[str, Any]], fields: dict[str, set[str] | list[str]]) -> list[str]:
    """``section.field`` of the plan that the release's dataclasses (``fields``: class name → field names) lack."""
    bad = []
    for section, values in p.items():
        if section not in SECTION_CLASSES or section_class(p, section) not in fields:
            bad.append(f"{section} (no such ConfigContainer section)")
            continue
        known = set(fields[section_class(p, section)])
        bad += [f"{section}.{name}" for name in values if name not in known]
    return bad
