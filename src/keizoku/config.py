"""The keizoku configuration: typed dataclasses, one YAML file, ``a.b=c`` overrides.

Precedence is command line > YAML > the defaults below (OmegaConf structured configs: unknown keys and
wrong types are errors that name the key path). ``validate`` then checks what types cannot: required
settings, ranges and combinations, again naming each key. ``keizoku config defaults`` prints every
setting with its help text; ``keizoku config check`` validates a file.

The shared sections (model, data, train, optim, schedule, checkpoint, eval, logging) mean the same for every
engine; engine-specific settings get their own section.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field, fields, is_dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal, Optional, Union, get_args, get_origin, get_type_hints

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from keizoku.errors import KeizokuError
from keizoku.rundir import RunDir, write_atomic


def setting(default, help: str):  # noqa: A002 - "help" reads best in the field declarations
    """A field with its help text; a class (list, dict, a section) as default means "a fresh one"."""
    if isinstance(default, type):
        return field(default_factory=default, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    hf_path: Optional[str] = setting(None, "Hugging Face model to continue from: a local directory or a hub id. Its "
                                           "pretrained weights are loaded (AutoModelForCausalLM).")
    init: Literal["pretrained", "random"] = setting("pretrained", "'random' builds the architecture of hf_path with "
                                                                  "random weights; only when asked for, never as a "
                                                                  "fallback.")
    tokenizer: Optional[str] = setting(None, "Tokenizer (directory or hub id) saved with exports; default: hf_path.")
    dtype: Literal["auto", "bf16", "fp32"] = setting("auto", "auto: bf16 mixed precision with fp32 master weights on "
                                                             "GPU, fp32 on CPU.")
    attn_implementation: str = setting("auto", "transformers attention implementation. auto: the model's own choice "
                                               "(sdpa where the model supports it, else eager: e.g. Gemma-2, whose "
                                               "attention soft-capping sdpa cannot do); or sdpa, eager, "
                                               "flash_attention_2, flex_attention.")
    activation_checkpointing: Literal["none", "selective", "full"] = setting(
        "none", "Recompute activations in the backward pass to save memory. none: keep all; selective: keep the matmul "
                "and attention outputs, recompute the cheap elementwise work (norms, RoPE, SiLU; engine: megatron: its "
                "selective recompute of core attention); full: keep only each decoder layer's input.")
    full_recompute_layers: int = setting(0, "The first N decoder layers recompute fully (keep only their input); the "
                                            "others use activation_checkpointing (none or selective). The dial between "
                                            "the modes for fitting a card: each such layer trades its kept activations "
                                            "for one more forward of the layer. engine: megatron: with none only "
                                            "(recompute_method: block).")
    fp8: Literal["none", "tensorwise", "rowwise"] = setting(
        "none", "engine: torch — FP8 matmuls in the decoder layers' linear layers (torchao float8 training; Hopper or "
                "newer; fp32 master weights and the bf16 output layer are unchanged). tensorwise: one scale per "
                "tensor, FP8 FSDP all-gather; rowwise: a scale per row. engine: megatron: megatron.precision.")
    fp8_layers: Literal["auto", "all"] = setting(
        "auto", "model.fp8 only. auto: leave in bf16 the linear layers too small for an FP8 matmul to pay for its "
                "casts (torchao's size thresholds per recipe; e.g. tensorwise keeps Llama-3.1-8B's k_proj and v_proj, "
                "4096 -> 1024, in bf16); all: every linear layer whose sizes are multiples of 16.")
    compile: Optional[bool] = setting(None, "torch.compile each decoder layer (and the chunked loss's elementwise "
                                            "work); default: on with CUDA, off on a CPU.")
    router_aux_loss_coef: Optional[float] = setting(
        None, "Mixture-of-experts models with a router load-balancing loss (Mixtral, Qwen-MoE, OLMoE, …): the "
              "training loss is the LM loss + this × the load-balancing loss (transformers' aux_loss; logged apart as "
              "router_aux_loss). Default: the model config's router_aux_loss_coef; 0: off. Other models: leave unset. "
              "engine: megatron: Megatron-Core's moe_aux_loss_coeff (its own per-layer loss; unset: the coefficient "
              "Megatron-Bridge sets).")
    trust_remote_code: bool = setting(False, "Allow model code from the hub (transformers' trust_remote_code).")


@dataclass
class DatasetEntry:
    path: str = setting(MISSING, "Dataset prefix (PATH for PATH.bin/.idx) or a directory with a keizoku manifest.")
    weight: Optional[float] = setting(None, "Relative sampling weight (Megatron --data-path W P semantics).")
    tokens: Optional[int] = setting(None, "Token budget: take this many tokens from the dataset, repeating or "
                                          "truncating.")


@dataclass
class DataConfig:
    blend: list[DatasetEntry] = setting(list, "Training datasets: [{path, weight}] or [{path, tokens}].")
    validation: dict[str, list[DatasetEntry]] = setting(dict, "Named validation sets, e.g. {ja: [{path: ...}], en: "
                                                              "[{path: ...}]}: loss and perplexity for each.")
    seq_length: int = setting(4096, "Tokens per training sequence (samples hold seq_length + 1 tokens).")
    seed: int = setting(1234, "Seed of the sample order (GPTDataset shuffle); the same seed gives the same samples.")
    cache_dir: Optional[str] = setting(None, "Where the dataset indices are cached; default RUN_DIR/data-cache.")
    num_workers: int = setting(2, "Data loader worker processes per rank.")
    mock: bool = setting(False, "Train on random tokens (smoke tests only). Never implied by a missing blend.")
    require_run_tokenizer: bool = setting(True, "Refuse datasets whose keizoku manifest names another tokenizer than "
                                                "the run's (by content); false: any tokenizer whose ids fit the "
                                                "model's vocabulary.")


@dataclass
class TrainConfig:
    global_batch_size: int = setting(8, "Sequences per optimizer step, over all data-parallel ranks.")
    micro_batch_size: int = setting(1, "Sequences per forward/backward on one rank; the rest is gradient accumulation.")
    max_steps: Optional[int] = setting(None, "Optimizer steps to train (give this or max_tokens).")
    max_tokens: Optional[int] = setting(None, "Tokens to train on (give this or max_steps).")
    seed: int = setting(1234, "Seed for model initialisation (init: random) and dropout.")
    device: Literal["auto", "cuda", "cpu"] = setting("auto", "auto: CUDA when available, else CPU.")
    loss_chunk_tokens: Optional[int] = setting(None, "engine: torch — compute the output layer and cross-entropy this "
                                                     "many tokens at a time, gradients included, so full-vocabulary "
                                                     "logits never exist (same result; 12+ GiB less memory at seq 8192 "
                                                     "× 2 with a 128k vocabulary). 0: the model's own logits, then the "
                                                     "loss. Default: 2048 with CUDA, 0 on a CPU (where the fused "
                                                     "cross-entropy is faster).")
    on_nan: Literal["stop", "skip"] = setting("stop", "NaN/inf loss or gradient: stop with a message, or skip the "
                                                      "step. A poisoned state is never checkpointed.")


@dataclass
class OptimConfig:
    lr: float = setting(3e-4, "Peak learning rate.")
    min_lr: float = setting(3e-5, "Learning rate at the end of the decay.")
    betas: tuple[float, float] = setting((0.9, 0.95), "AdamW betas.")
    eps: float = setting(1e-8, "AdamW epsilon.")
    weight_decay: float = setting(0.1, "Decoupled weight decay; not applied to biases, norms and embeddings' norms.")
    grad_clip: float = setting(1.0, "Clip the global gradient norm to this; 0 turns clipping off.")
    fused: Optional[bool] = setting(None, "Fused AdamW kernel; default: on where supported (CUDA).")
    state_dtype: Literal["fp32", "bf16"] = setting("fp32", "dtype of AdamW's two moments. bf16 halves the optimizer "
                                                           "state (stochastic rounding; the weights stay fp32): "
                                                           "Llama-3.1-8B on 2 GPUs saves 16 GB per GPU. megatron: the "
                                                           "precision-aware optimizer (needs TE and "
                                                           "megatron.distributed_optimizer).")


@dataclass
class ScheduleConfig:
    kind: Literal["cosine", "wsd", "constant"] = setting("cosine", "cosine: warmup then cosine to min_lr; wsd: warmup, "
                                                                   "constant, then a linear decay to min_lr; constant: "
                                                                   "warmup then lr.")
    warmup_steps: int = setting(0, "Linear warmup from 0 to lr over this many steps.")
    decay_fraction: float = setting(0.1, "wsd: the share of all steps spent in the final decay.")


@dataclass
class CheckpointConfig:
    interval: int = setting(1000, "Save every N steps (0: only at the end).")
    keep_last: int = setting(3, "Keep the newest K checkpoints.")
    resume: str = setting("auto", "auto: continue from the newest complete checkpoint in the run directory if there is "
                                  "one; none: start afresh; or a checkpoint directory.")
    save_at_end: bool = setting(True, "Save when training completes.")
    background: bool = setting(True, "engine: torch: write checkpoints while training goes on (each rank's model and "
                                     "optimizer shard is first copied to host memory, pinned on a GPU: 12 bytes a "
                                     "parameter / ranks, kept between saves); false: training waits while they "
                                     "are written, and no host copy is kept.")


@dataclass
class DownstreamConfig:
    tasks: list[str] = setting(list, "lm-evaluation-harness tasks to score checkpoints on while training, without "
                                     "stopping it (keizoku eval; docs/eval.md): task, group or tag names and presets "
                                     "(ja, en), e.g. [ja, mmlu]. []: off.")
    every: int = setting(1, "Evaluate the checkpoints of the steps that are multiples of every × checkpoint.interval, "
                            "and the last step's (0: off). A local run: `keizoku eval` in a separate process, started "
                            "once the checkpoint is published (its log: RUN_DIR/logs/eval-step_N.log); under a "
                            "batch scheduler: a job of its own (keizoku submit eval, with eval.downstream.profile).")
    limit: Optional[int] = setting(None, "At most this many examples per task (a quick look; such scores are not "
                                         "comparable with full ones).")
    num_fewshot: Optional[int] = setting(None, "Few-shot examples per prompt; default: each task's own.")
    batch_size: int = setting(8, "Requests per forward pass.")
    include_path: Optional[str] = setting(None, "A directory of your own lm-eval task YAMLs (keizoku eval "
                                                "--include-path).")
    device: Optional[str] = setting(None, "Where the evaluation runs: cpu, cuda, cuda:N or auto (cuda if there is "
                                          "one). Default: cpu beside a local run (it never takes memory from "
                                          "training's GPUs: it sees none), auto in a scheduler's eval job (which has "
                                          "its own allocation). cuda:N beside a local run: a GPU that training "
                                          "leaves free.")
    keep_export: bool = setting(False, "Keep each evaluated checkpoint's Hugging Face export (RUN_DIR/eval/step_N/hf, "
                                       "as large as the model in its dtype); false: removed once it is evaluated.")
    profile: Optional[str] = setting(None, "Under a batch scheduler: the site profile (a name or YAML file, as for "
                                           "keizoku submit) of the eval jobs. Required there: without it a due "
                                           "checkpoint is not evaluated, and the training log says so.")
    profile_set: list[str] = setting(list, "Overrides of that profile (keizoku submit --set), e.g. "
                                           "[walltime=02:00:00, group=tga12345, gpus_per_node=1].")


def _check_downstream(d: DownstreamConfig) -> list[str]:
    err = []
    if any(not t.strip() or t.strip() != t for t in d.tasks):
        err.append(f"eval.downstream.tasks: an empty or padded name in {list(d.tasks)}; give lm-eval task names "
                   "or presets (ja, en)")
    if d.every < 0:
        err.append(f"eval.downstream.every: must be >= 0 (0: off), not {d.every}")
    if d.limit is not None and d.limit < 1:
        err.append(f"eval.downstream.limit: must be at least 1 (or null: every example), not {d.limit}")
    if d.num_fewshot is not None and d.num_fewshot < 0:
        err.append(f"eval.downstream.num_fewshot: must be >= 0 (or null: each task's own), not {d.num_fewshot}")
    if d.batch_size < 1:
        err.append(f"eval.downstream.batch_size: must be at least 1, not {d.batch_size}")
    if d.device is not None and not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", d.device):
        err.append(f"eval.downstream.device: {d.device!r} is not cpu, cuda, cuda:N, mps or auto")
    if any("=" not in s for s in d.profile_set):
        err.append(f"eval.downstream.profile_set: each must be key=value, not {list(d.profile_set)}")
    return err


@dataclass
class EvalConfig:
    interval: int = setting(1000, "Evaluate every N steps (0: never during training).")
    batches: int = setting(8, "Micro batches per validation set and evaluation.")
    at_start: bool = setting(True, "Evaluate before the first step (the base model's loss).")
    downstream: DownstreamConfig = setting(DownstreamConfig, "Downstream benchmarks (lm-evaluation-harness) on saved "
                                                             "checkpoints, in the background (docs/eval.md).")


@dataclass
class LoggingConfig:
    interval: int = setting(1, "Log every N steps (console, RUN_DIR/metrics.jsonl).")
    tensorboard: bool = setting(True, "Write TensorBoard events to RUN_DIR/tensorboard.")
    wandb: bool = setting(False, "Log to Weights & Biases (needs wandb installed and configured).")
    wandb_project: Optional[str] = setting(None, "W&B project.")
    profile_step: int = setting(0, "engine: torch — record this step (1-based) with torch.profiler: RUN_DIR/profile/ "
                                   "gets each rank's timeline (.trace.json.gz, for Perfetto) and its operators by "
                                   "device time (.txt). 0: off.")
    profile_ranks: list[int] = field(default_factory=lambda: [0], metadata={"help": (
        "The ranks that record logging.profile_step (each writes a trace of tens of MB; Megatron's default is "
        "rank 0 too), e.g. [0, 8] for the first GPU of two nodes.")})


@dataclass
class ParallelConfig:
    backend: Literal["auto", "nccl", "gloo"] = setting("auto", "torch.distributed backend; auto: nccl on GPU, gloo on "
                                                               "CPU.")
    data_parallel_size: Optional[int] = setting(None, "Data-parallel ranks; default: the world size.")
    reshard_after_forward: Optional[bool] = setting(
        None, "engine: torch — FSDP2: free each layer's gathered parameters after its forward and gather them again "
              "for its backward (less memory, twice the gathers). false: the weights are gathered once a step and stay "
              "gathered through all its micro batches. Default: true on several GPUs, false on one (nothing is sharded "
              "there; it only saves the bf16 copy of the weights).")
    grad_accumulation: Literal["auto", "sharded", "unsharded"] = setting(
        "auto", "engine: torch — how gradients are summed over a step's micro batches. sharded: reduce-scattered after "
                "every micro batch and summed in each GPU's fp32 shard (least memory; FSDP's way). unsharded: summed "
                "in a full fp32 gradient on every GPU (4 bytes a parameter) and reduced once per step (with "
                "reshard_after_forward: false, Megatron DDP's way: one gather and one reduction a step). auto: "
                "unsharded on one GPU, where it costs no memory; sharded otherwise.")
    reduce_dtype: Literal["fp32", "bf16"] = setting(
        "fp32", "engine: torch — dtype of the gradient reduce-scatter across GPUs (torchtitan's "
                "mixed_precision_reduce). bf16 halves its traffic; each GPU's sum is rounded to bf16 before it is "
                "added into the fp32 shard. Not with grad_accumulation: unsharded (it would sum micro batches in "
                "bf16).")


@dataclass
class MegatronConfig:
    tensor_parallel: int = setting(1, "Tensor-parallel size (Megatron tensor_model_parallel_size).")
    pipeline_parallel: int = setting(1, "Pipeline-parallel size.")
    virtual_pipeline: Optional[int] = setting(None, "Virtual pipeline stages per pipeline rank (interleaved schedule); "
                                                    "needs pipeline_parallel > 1.")
    context_parallel: int = setting(1, "Context-parallel size (long sequences); data.seq_length must be divisible by 2 "
                                       "× context_parallel.")
    sequence_parallel: bool = setting(False, "Sequence parallelism of norms and dropout over the tensor-parallel "
                                             "ranks; needs tensor_parallel > 1.")
    expert_parallel: int = setting(1, "Expert-parallel size (MoE models only).")
    precision: Literal["bf16", "fp8"] = setting("bf16", "bf16: bf16 mixed precision with fp32 main weights; fp8: FP8 "
                                                        "matmuls through Transformer Engine (Hopper or newer). "
                                                        "model.dtype: fp32 trains in fp32 instead.")
    fp8_recipe: Literal["tensorwise", "delayed", "mxfp8", "blockwise"] = setting(
        "tensorwise", "precision: fp8 only. tensorwise: current scaling per tensor; delayed: amax history; mxfp8: MX "
                      "block scaling (Blackwell); blockwise: 128-element blocks (DeepSeek-V3 style).")
    distributed_optimizer: bool = setting(True, "Shard optimizer state over data-parallel ranks (ZeRO-1).")
    overlap_grad_reduce: bool = setting(True, "Overlap the gradient reduce-scatter/all-reduce with the backward pass.")
    overlap_param_gather: bool = setting(True, "Overlap the parameter all-gather with the forward pass; needs "
                                               "distributed_optimizer.")
    transformer_impl: Literal["transformer_engine", "local"] = setting(
        "transformer_engine", "Layer implementation: transformer_engine (the NeMo container; needed for fp8), or local "
                              "(Megatron-Core's own layers, for machines without Transformer Engine: unfused attention "
                              "and no TE-only fusions).")
    async_save: bool = setting(False, "Write checkpoints in the background while training continues.")
    import_dir: Optional[str] = setting(None, "Where the Megatron import of model.hf_path is cached, one directory per "
                                              "HF checkpoint fingerprint; default RUN_DIR/pretrained-megatron. Point "
                                              "runs of the same base model at one shared directory to import once.")
    overrides: dict[str, Any] = setting(dict, "Megatron-Bridge fields keizoku does not name, set last: "
                                              "{\"model.apply_rope_fusion\": false, \"ddp.bucket_size\": 40000000}; "
                                              "sections: model, train, optimizer, scheduler, ddp, dataset, checkpoint, "
                                              "logger, dist, rng. An unknown field is an error.")


@dataclass
class PhaseConfig:
    name: str = setting(MISSING, "The phase's name (metrics, checkpoints and the report carry it), e.g. main, anneal.")
    max_steps: Optional[int] = setting(None, "Optimizer steps of this phase (give this or max_tokens).")
    max_tokens: Optional[int] = setting(None, "Tokens of this phase, rounded up to whole global batches.")
    blend: list[DatasetEntry] = setting(list, "This phase's training datasets, as data.blend (default: data.blend). "
                                              "Each phase draws its own samples (seed data.seed + its index).")
    validation: Optional[dict[str, list[DatasetEntry]]] = setting(None, "This phase's validation sets, as "
                                                                        "data.validation (default: data.validation).")
    lr: Optional[float] = setting(None, "The learning rate the phase reaches after its warmup, and decays from. "
                                        "Default: the first phase optim.lr; a later phase the rate where the one "
                                        "before it ended (the schedule goes on from where it is).")
    min_lr: Optional[float] = setting(None, "Where the decay ends, at the phase's last step (default: optim.min_lr).")
    warmup_steps: int = setting(0, "Linear warmup over this many steps, from the rate where the run is (0 for the "
                                   "first phase) to lr: a re-warm (Ibrahim et al. 2024).")
    decay: Literal["constant", "linear", "cosine"] = setting(
        "constant", "The phase's rate after its warmup. constant: lr; linear, cosine: from lr down to min_lr at the "
                    "phase's last step (an anneal).")


@dataclass
class KeizokuConfig:
    engine: Literal["torch", "megatron"] = setting("torch", "torch: FSDP2 on the Hugging Face model; megatron: "
                                                            "Megatron-Bridge.")
    run_dir: str = setting("runs/keizoku", "Run directory: resolved config, checkpoints, metrics, logs.")
    model: ModelConfig = setting(ModelConfig, "The model to continue pre-training.")
    data: DataConfig = setting(DataConfig, "Tokenized datasets (keizoku tokenize) and how samples are drawn.")
    train: TrainConfig = setting(TrainConfig, "Batch sizes and length of training.")
    optim: OptimConfig = setting(OptimConfig, "AdamW.")
    schedule: ScheduleConfig = setting(ScheduleConfig, "Learning-rate schedule.")
    checkpoint: CheckpointConfig = setting(CheckpointConfig, "Sharded checkpoints (torch.distributed.checkpoint).")
    eval: EvalConfig = setting(EvalConfig, "Validation loss and perplexity on data.validation.")
    logging: LoggingConfig = setting(LoggingConfig, "Metrics.")
    parallel: ParallelConfig = setting(ParallelConfig, "Distribution over GPUs and nodes.")
    megatron: MegatronConfig = setting(MegatronConfig, "engine: megatron only — Megatron-Bridge parallelism, precision "
                                                       "and the HF import.")
    phases: list[PhaseConfig] = setting(
        list, "Train in phases, in order, in one run directory: each with its length, data (blend), validation sets and "
              "part of the LR schedule, e.g. [{name: main, max_tokens: 9e9, warmup_steps: 100}, {name: anneal, "
              "max_tokens: 1e9, blend: [...], decay: linear}]. The optimizer state carries across; the last checkpoint "
              "of each phase is kept. With phases, train.max_steps/max_tokens and schedule are not used (leave them "
              "unset).")
    extensions: list[PhaseConfig] = setting(
        list, "What a finished run was extended by, in order (keizoku extend RUN_DIR writes them; a run's own "
              "record, RUN_DIR/config.yaml, supplies them to every later start): each is a phase after the run's "
              "end, continuing the decay from where the rate is or re-warming (warmup_steps, lr).")


class ConfigError(KeizokuError, ValueError):
    """Invalid configuration; the message names each key path at fault."""


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> KeizokuConfig:
    """Defaults, then the YAML file, then ``a.b=c`` overrides; type-checked and validated. A problem is a
    ``ConfigError`` that says where it is: ``FILE:LINE:COL: key: ...`` in the YAML file (a syntax error is followed
    by the offending line, indented), ``override a.b=c: ...`` on the command line, the key path for what
    ``validate`` finds (one line each)."""
    merged = OmegaConf.structured(KeizokuConfig)
    text = None
    if path is not None:
        text = _read_text(path)
        merged = _merge_yaml(merged, path, text)
    for item in overrides:
        merged = _merge_override(merged, item)
    merged = _with_recorded_extensions(merged)
    try:
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:  # what only the whole config shows: a value still missing, ...
        raise ConfigError(_blame(e, path, text, overrides)) from None
    errors = validate(cfg)
    if errors:
        raise ConfigError("\n".join(errors))
    return cfg


_SEE_DEFAULTS = "keizoku config defaults lists every setting"


def _with_recorded_extensions(merged: DictConfig) -> DictConfig:
    """A run's extensions are the run's (``keizoku extend`` records them in RUN_DIR/config.yaml), not its config
    file's: a config that names none gets the run's, so every later start, ``status`` and ``submit`` see them."""
    if merged.extensions or OmegaConf.is_missing(merged, "run_dir"):
        return merged
    recorded = RunDir(merged.run_dir).config
    try:
        extensions = (yaml.safe_load(recorded.read_text()) or {}).get("extensions") if recorded.is_file() else None
    except (OSError, yaml.YAMLError, AttributeError):
        return merged  # unreadable: the start's own check of the run (save_resolved) says so
    if not extensions:
        return merged
    try:
        return OmegaConf.merge(merged, {"extensions": extensions})
    except OmegaConfBaseException as e:
        raise ConfigError(f"{recorded}: extensions: {_omegaconf_message(e)}") from None


def _read_text(path: str | os.PathLike) -> str:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte {data[e.start]:#04x}); save the file as UTF-8") from None


def _merge_yaml(merged: DictConfig, path: str | os.PathLike, text: str) -> DictConfig:
    """``merged`` with the YAML file's settings on top; a problem names the file's line and column and the key."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is None or isinstance(node, yaml.ScalarNode) and node.tag.endswith(":null"):  # empty, comments, ---
            return merged
        if not isinstance(node, yaml.MappingNode):
            raise ConfigError(f"{_at(path, node)}: the top level must be a mapping of sections (model:, data:, "
                              f"train:, ...), not {_shown(node)}; {_SEE_DEFAULTS}")
        problem = _shape_problem(node, KeizokuConfig, "")
        if problem:
            raise ConfigError(f"{_at(path, problem[0])}: {problem[1]}: {problem[2]}")
        created = OmegaConf.create(text)  # OmegaConf's own loader: duplicate keys, 1e-4 as a float
    except yaml.YAMLError as e:
        raise ConfigError(_yaml_syntax_error(path, text, e)) from None
    try:
        return OmegaConf.merge(merged, created)
    except OmegaConfBaseException as e:
        raise ConfigError(_blame(e, path, text, ())) from None
    except (TypeError, ValueError) as e:  # what the shape check above did not foresee
        raise ConfigError(f"{path}: {e}") from None


def _merge_override(merged: DictConfig, item: str) -> DictConfig:
    """``merged`` with one ``key.path=value`` on top; a problem is blamed on the override, never on the file."""
    key, eq, value = item.partition("=")
    if not eq or not key or "" in key.split("."):
        raise ConfigError(f"override {item!r}: expected key.path=value")
    unknown, tp = _override_target(key)
    if unknown:
        raise ConfigError(f"override {item}: {unknown}")
    try:
        node = yaml.compose(value, Loader=yaml.SafeLoader)
        problem = _shape_problem(node, tp, key) if node is not None and tp is not None else None
        if not problem:
            return OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item}: the value is not valid YAML ({getattr(e, 'problem', None) or e}); "
                          f"quote the whole override as one shell word: '{key}=...'") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"override {item}: {getattr(e, 'full_key', None) or key}: {_omegaconf_message(e)}") from None
    except (TypeError, ValueError) as e:  # data.blend[0].path=x: OmegaConf cannot merge into one list element
        if "[" in key:
            raise ConfigError(f"override {item}: one element of a list cannot be set on its own; give the whole "
                              f"list: '{key.partition('[')[0]}=[...]'") from None
        raise ConfigError(f"override {item}: {e}") from None
    raise ConfigError(f"override {item}: {problem[1]}: {problem[2]}")


def _at(path: str | os.PathLike, node: yaml.Node) -> str:
    return f"{path}:{node.start_mark.line + 1}:{node.start_mark.column + 1}"


def _shown(node: yaml.Node) -> str:
    """A YAML node as an error message names it."""
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    if node.tag.endswith(":null"):
        return "empty"
    return node.value if node.style is None else repr(node.value)


def _yaml_syntax_error(path: str | os.PathLike, text: str, e: yaml.YAMLError) -> str:
    """``FILE:LINE:COL: invalid YAML: ...`` and, on a second line, the offending line."""
    mark = getattr(e, "problem_mark", None)
    if mark is None:
        return f"{path}: invalid YAML ({' '.join(str(e).split())})"
    problem = getattr(e, "problem", None) or "invalid YAML"
    context, cmark = getattr(e, "context", None), getattr(e, "context_mark", None)
    if context and cmark is not None and (cmark.line, cmark.column) != (mark.line, mark.column):
        problem += f" ({context} at {cmark.line + 1}:{cmark.column + 1})"
    line = text.splitlines()[mark.line] if mark.line < len(text.splitlines()) else ""
    offending = f"\n  {mark.line + 1} | {line}" if line.strip() else ""
    return f"{path}:{mark.line + 1}:{mark.column + 1}: invalid YAML: {problem}{offending}"


@cache
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    """(T, True) for Optional[T], else (tp, False)."""
    import types

    if get_origin(tp) in (Union, types.UnionType) and type(None) in get_args(tp):
        rest = [a for a in get_args(tp) if a is not type(None)]
        return (rest[0] if len(rest) == 1 else Any), True
    return tp, False


def _shape_problem(node: yaml.Node, tp: Any, key: str) -> tuple[yaml.Node, str, str] | None:
    """The first place where the YAML's nesting is not the settings': an unknown key, a section or mapping that
    is not one, a list that is not a list. (node, key path, what is wrong); the values are OmegaConf's to check."""
    tp, optional = _strip_optional(tp)
    if optional and isinstance(node, yaml.ScalarNode) and node.tag.endswith(":null"):
        return None
    origin = get_origin(tp)
    if is_dataclass(tp) or origin is dict:
        if not isinstance(node, yaml.MappingNode):
            if isinstance(node, yaml.ScalarNode) and node.tag.endswith(":null"):
                return node, key, "is empty; give its settings, indented below it, or delete the line"
            return node, key, f"must be a mapping ({{key: value, ...}}), not {_shown(node)}"
        hints = _hints(tp) if is_dataclass(tp) else None
        for k, v in node.value:
            if k.tag.endswith(":merge"):  # <<: *anchor, merged when OmegaConf reads the file
                continue
            name = k.value if isinstance(k, yaml.ScalarNode) else _shown(k)
            child = f"{key}.{name}" if key else name
            if hints is not None and name not in hints:
                return k, child, _not_a_setting(child, list(hints))
            found = _shape_problem(v, hints[name] if hints is not None else get_args(tp)[1], child)
            if found:
                return (k, *found[1:]) if found[0] is v else found  # a value is found at its key
    elif origin in (list, tuple):
        if not isinstance(node, yaml.SequenceNode):
            return node, key, f"must be a list ([...]), not {_shown(node)}"
        args = get_args(tp)
        if origin is tuple and Ellipsis not in args and len(node.value) != len(args):
            return node, key, f"must be a list of {len(args)} values, not {len(node.value)}"
        for i, v in enumerate(node.value if origin is list else ()):
            found = _shape_problem(v, args[0], f"{key}[{i}]")
            if found:
                return found
    elif (tp in (str, int, float, bool) or origin is Literal) and not isinstance(node, yaml.ScalarNode):
        return node, key, f"must be a single value, not {_shown(node)}"
    return None


def _override_target(key: str) -> tuple[str | None, Any]:
    """What an override's key names: (None, its type), or (``key.path: not a setting; did you mean ...``, None) for
    a key that names no setting; (None, None) where the schema cannot say (OmegaConf checks it then)."""
    tp, done = KeizokuConfig, ""
    for part in re.findall(r"\[\d+\]|[^.\[\]]+", key):
        tp = _strip_optional(tp)[0]
        if part.startswith("[") and get_origin(tp) is list:
            tp, done = get_args(tp)[0], done + part
        elif not part.startswith("[") and is_dataclass(tp):
            child = f"{done}.{part}" if done else part
            if part not in _hints(tp):
                return f"{child}: {_not_a_setting(child, list(_hints(tp)), typed=key)}", None
            tp, done = _hints(tp)[part], child
        elif not part.startswith("[") and get_origin(tp) is dict:  # data.validation.NAME, megatron.overrides.*
            tp, done = get_args(tp)[1], f"{done}.{part}"
        else:
            return None, None
    return None, tp


@cache
def _setting_paths() -> tuple[str, ...]:
    """Every section and setting as a key path: model, model.hf_path, ..."""
    paths = []

    def walk(cls: type, prefix: str) -> None:
        for name, tp in _hints(cls).items():
            paths.append(prefix + name)
            if is_dataclass(tp):
                walk(tp, f"{prefix}{name}.")

    walk(KeizokuConfig, "")
    return tuple(paths)


def _not_a_setting(key: str, level: list[str], typed: str | None = None) -> str:
    """What to say of ``key``, which names no setting (``level``: the names next to it; ``typed``: the whole key
    given, for an override), with the closest keys by difflib."""
    parent, _, name = key.rpartition(".")
    plain = re.sub(r"\[\d+\]", "", name)
    close = []
    if typed and typed != key:  # traim.max_steps: train.max_steps, more than the section
        close = difflib.get_close_matches(typed, _setting_paths(), n=3, cutoff=0.75)
    near = [n for n in level if n.startswith(plain)] or difflib.get_close_matches(plain, level, n=3)  # hf: hf_path
    close = close or [f"{parent}.{n}" if parent else n for n in near[:3]]
    if not parent:  # global_batch_size: train.global_batch_size, the section left out
        close = close or difflib.get_close_matches(key, _setting_paths(), n=3, cutoff=0.75)
    close = close or [p for p in _setting_paths() if p.rpartition(".")[2] == plain][:3]  # lr: optim.lr
    return f"not a setting; did you mean {' or '.join(close)}? ({_SEE_DEFAULTS})" if close else \
        f"not a setting ({_SEE_DEFAULTS})"


def _omegaconf_message(e: OmegaConfBaseException) -> str:
    """An OmegaConf error's first line, without its own suggestions and object names."""
    from omegaconf.errors import MissingMandatoryValue

    if isinstance(e, MissingMandatoryValue):
        return "required, and not given"
    message = re.sub(r"\. Did you mean.*$", "", str(e).splitlines()[0])
    return re.sub(r"^field '.*' is not Optional$", "must have a value (it cannot be null or empty)", message)


def _blame(e: OmegaConfBaseException, path: str | os.PathLike | None, text: str | None,
           overrides: list[str] | tuple[str, ...]) -> str:
    """An OmegaConf error, named by the override that sets its key, else by the YAML file's line and column."""
    key = getattr(e, "full_key", None) or ""
    what = _omegaconf_message(e)
    for item in reversed(list(overrides)):
        k = item.partition("=")[0]
        if key == k or key.startswith((k + ".", k + "[")):
            return f"override {item}: {key}: {what}"
    if path is None:
        return f"{key}: {what}" if key else what
    entries = _yaml_entries(yaml.compose(text, Loader=yaml.SafeLoader)) if text else {}
    if key not in entries and "." not in key:  # a list entry's key comes without its path (data.blend[0].weight)
        value = str(getattr(e, "value", ""))
        full = [p for p, (_, v) in entries.items() if p.endswith("." + key) and getattr(v, "value", None) == value]
        key = full[0] if len(full) == 1 else key
    found = key
    while found and found not in entries:
        found = re.sub(r"(\.[^.\[\]]+|\[\d+\])$", "", found) if re.search(r"[.\[]", found) else ""
    where = _at(path, entries[found][0]) if found else str(path)
    return f"{where}: {key}: {what}" if key else f"{where}: {what}"


def _yaml_entries(node: yaml.Node | None, key: str = "", out: dict | None = None) -> dict[str, tuple]:
    """Every key path of a composed YAML document: (its key node, or the list item, and its value node)."""
    out = {} if out is None else out
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if isinstance(k, yaml.ScalarNode):
                child = f"{key}.{k.value}" if key else k.value
                out[child] = (k, v)
                _yaml_entries(v, child, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            out[f"{key}[{i}]"] = (v, v)
            _yaml_entries(v, f"{key}[{i}]", out)
    return out


# engine: torch's FSDP settings whose default depends on the number of GPUs
def reshard_after_forward(p: ParallelConfig, world_size: int) -> bool:
    """parallel.reshard_after_forward, its default resolved: true on several GPUs, false on one."""
    return world_size > 1 if p.reshard_after_forward is None else p.reshard_after_forward


def unsharded_grad_accumulation(p: ParallelConfig, world_size: int) -> bool:
    """Whether micro batches' gradients are summed unsharded (parallel.grad_accumulation, auto: on one GPU)."""
    return p.grad_accumulation == "unsharded" or p.grad_accumulation == "auto" and world_size == 1


def validate(cfg: KeizokuConfig, world_size: int | None = None) -> list[str]:
    """What the types cannot say; each message starts with the key path. ``world_size``: checked against it too
    once training has started (the command line does not know it yet)."""
    phased = bool(cfg.phases)
    return (_check_model(cfg) + _check_data(cfg.data, phased, needs_blend=not phased or not all(p.blend for p in cfg.phases))
            + _check_train(cfg.train, phased) + _check_parallelism(cfg, world_size) + _check_optim(cfg.optim)
            + (_check_schedule(cfg.schedule, cfg.train) if not phased else [])
            + _check_phases(cfg) + _check_run(cfg, world_size) + _check_downstream(cfg.eval.downstream))


def _check_model(cfg: KeizokuConfig) -> list[str]:
    err, m = [], cfg.model
    if not m.hf_path:
        err.append("model.hf_path: required — the Hugging Face model (directory or hub id) to continue from")
    if not m.attn_implementation.strip():
        err.append("model.attn_implementation: empty; use auto (the model's own choice), sdpa, eager, ...")
    if m.full_recompute_layers < 0:
        err.append(f"model.full_recompute_layers: must be >= 0, not {m.full_recompute_layers}")
    if m.router_aux_loss_coef is not None and not m.router_aux_loss_coef >= 0:
        err.append(f"model.router_aux_loss_coef: must be >= 0 (0: off), not {m.router_aux_loss_coef}")
    if m.full_recompute_layers > 0 and m.activation_checkpointing == "full":
        err.append("model.full_recompute_layers: every layer already recomputes fully with "
                   "model.activation_checkpointing: full (use none or selective for the other layers)")
    return err


def _check_data(d: DataConfig, phased: bool = False, needs_blend: bool = True) -> list[str]:
    err = []
    if not d.blend and not d.mock and needs_blend:
        err.append("data.blend: no training data given (keizoku never falls back to mock data; set data.mock: true "
                   "to train on random tokens)" + ("; or give every phase its blend" if phased else ""))
    if d.blend and d.mock:
        err.append("data.mock: true together with data.blend; choose one")
    for name, entries in [("data.blend", d.blend)] + [(f"data.validation.{k}", v) for k, v in d.validation.items()]:
        err += _check_entries(name, entries, budgets_allowed=name == "data.blend")
    if d.seq_length < 1:
        err.append(f"data.seq_length: must be at least 1, not {d.seq_length}")
    if d.num_workers < 0:
        err.append(f"data.num_workers: must be >= 0, not {d.num_workers}")
    return err


def _check_train(t: TrainConfig, phased: bool = False) -> list[str]:
    err = []
    if phased and (t.max_steps is not None or t.max_tokens is not None):
        err.append("train.max_steps / train.max_tokens: the run's length is its phases' (phases[*].max_steps or "
                   "max_tokens); leave these unset")
    elif not phased and (t.max_steps is None) == (t.max_tokens is None):
        err.append("train.max_steps / train.max_tokens: give exactly one")
    for key in ("max_steps", "max_tokens", "global_batch_size", "micro_batch_size"):
        value = getattr(t, key)
        if value is not None and value < 1:
            err.append(f"train.{key}: must be at least 1, not {value}")
    if t.loss_chunk_tokens is not None and t.loss_chunk_tokens < 0:
        err.append(f"train.loss_chunk_tokens: must be >= 0 (0: no chunking), not {t.loss_chunk_tokens}")
    return err


def _check_parallelism(cfg: KeizokuConfig, world_size: int | None) -> list[str]:
    """The batch against the data-parallel size, and each engine's parallel settings."""
    err, t, p = [], cfg.train, cfg.parallel
    dp = p.data_parallel_size or world_size
    if cfg.engine == "megatron":
        model_parallel = _megatron_model_parallel(cfg.megatron)
        dp = p.data_parallel_size or (world_size // model_parallel if world_size else None)
        err += _check_megatron(cfg, world_size)
    if t.micro_batch_size >= 1 and t.global_batch_size >= 1 and t.global_batch_size % (t.micro_batch_size * (dp or 1)):
        what = f"train.micro_batch_size × data-parallel size = {t.micro_batch_size} × {dp}" if dp else \
            f"train.micro_batch_size = {t.micro_batch_size}"
        err.append(f"train.global_batch_size: {t.global_batch_size} is not divisible by {what}")
    if cfg.engine == "torch" and p.data_parallel_size is not None and world_size is not None \
            and p.data_parallel_size != world_size:
        err.append(f"parallel.data_parallel_size: {p.data_parallel_size} differs from the world size "
                   f"{world_size} (the torch engine is data-parallel only)")
    if cfg.engine == "torch" and p.reduce_dtype == "bf16" and unsharded_grad_accumulation(p, world_size or 0):
        err.append("parallel.reduce_dtype: bf16 with unsharded gradient accumulation (parallel.grad_accumulation; "
                   "auto means unsharded on one GPU) would sum the micro batches in bf16; use fp32, or "
                   "grad_accumulation: sharded")
    return err


def _check_optim(o: OptimConfig) -> list[str]:
    err = []
    if not o.lr > 0:
        err.append(f"optim.lr: must be > 0, not {o.lr}")
    if not 0 <= o.min_lr <= o.lr:
        err.append(f"optim.min_lr: must be between 0 and optim.lr ({o.lr}), not {o.min_lr}")
    if not all(0 <= b < 1 for b in o.betas):
        err.append(f"optim.betas: each must be in [0, 1), not {list(o.betas)}")
    for key in ("eps", "weight_decay", "grad_clip"):
        if getattr(o, key) < 0:
            err.append(f"optim.{key}: must be >= 0, not {getattr(o, key)}")
    return err


def _check_schedule(s: ScheduleConfig, t: TrainConfig) -> list[str]:
    err = []
    if s.warmup_steps < 0:
        err.append(f"schedule.warmup_steps: must be >= 0, not {s.warmup_steps}")
    if t.max_steps is not None and s.warmup_steps > t.max_steps:
        err.append(f"schedule.warmup_steps: {s.warmup_steps} is more than train.max_steps ({t.max_steps})")
    if not 0 < s.decay_fraction <= 1:
        err.append(f"schedule.decay_fraction: must be in (0, 1], not {s.decay_fraction}")
    return err


def _check_phases(cfg: KeizokuConfig) -> list[str]:
    """phases and extensions: each one's length, rates and data."""
    err, names = [], set()
    for section, phases in (("phases", cfg.phases), ("extensions", cfg.extensions)):
        for i, ph in enumerate(phases):
            key = f"{section}[{i}]"
            if not ph.name or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", ph.name):
                err.append(f"{key}.name: {ph.name!r}: use letters, digits, '_', '-' and '.' (it names files)")
            elif ph.name in names:
                err.append(f"{key}.name: {ph.name!r} is used twice; each phase needs its own name")
            names.add(ph.name)
            if (ph.max_steps is None) == (ph.max_tokens is None):
                err.append(f"{key}: give exactly one of max_steps and max_tokens")
            for name in ("max_steps", "max_tokens"):
                if getattr(ph, name) is not None and getattr(ph, name) < 1:
                    err.append(f"{key}.{name}: must be at least 1, not {getattr(ph, name)}")
            if ph.warmup_steps < 0 or ph.max_steps is not None and ph.warmup_steps > ph.max_steps:
                err.append(f"{key}.warmup_steps: must be between 0 and the phase's max_steps, not {ph.warmup_steps}")
            if ph.lr is not None and not ph.lr > 0:
                err.append(f"{key}.lr: must be > 0, not {ph.lr}")
            if ph.min_lr is not None and not ph.min_lr >= 0:
                err.append(f"{key}.min_lr: must be >= 0, not {ph.min_lr}")
            err += _check_entries(f"{key}.blend", ph.blend, budgets_allowed=True)
            for name, entries in (ph.validation or {}).items():
                err += _check_entries(f"{key}.validation.{name}", entries, budgets_allowed=False)
    if cfg.phases and cfg.data.mock:
        err.append("phases: not with data.mock (each phase names its data)")
    return err


def _check_run(cfg: KeizokuConfig, world_size: int | None) -> list[str]:
    """Checkpoints, evaluation and logging."""
    err, c, e, lg = [], cfg.checkpoint, cfg.eval, cfg.logging
    if c.keep_last < 1:
        err.append(f"checkpoint.keep_last: must be at least 1, not {c.keep_last}")
    if c.interval < 0:
        err.append(f"checkpoint.interval: must be >= 0, not {c.interval}")
    if c.resume not in ("auto", "none") and not Path(c.resume).exists():
        err.append(f"checkpoint.resume: {c.resume!r} is neither auto, none nor an existing checkpoint directory")
    if e.interval < 0 or e.batches < 1:
        err.append(f"eval: interval must be >= 0 and batches >= 1, not {e.interval} and {e.batches}")
    if lg.interval < 1:
        err.append(f"logging.interval: must be at least 1, not {lg.interval}")
    if lg.profile_step < 0:
        err.append(f"logging.profile_step: must be >= 0 (0: off), not {lg.profile_step}")
    bad_ranks = [r for r in lg.profile_ranks if r < 0 or world_size is not None and r >= world_size]
    if lg.profile_step and bad_ranks:
        err.append(f"logging.profile_ranks: {bad_ranks} " + (f"not below the world size {world_size}" if world_size
                                                              else "negative"))
    return err


def _megatron_model_parallel(mg: MegatronConfig) -> int:
    return max(mg.tensor_parallel, 1) * max(mg.pipeline_parallel, 1) * max(mg.context_parallel, 1)


def _check_megatron(cfg: KeizokuConfig, world_size: int | None) -> list[str]:
    """engine: megatron — combinations Megatron-Core would refuse later, or that keizoku cannot honour there."""
    return _check_megatron_layout(cfg, world_size) + _megatron_cannot_honour(cfg)


def _check_megatron_layout(cfg: KeizokuConfig, world_size: int | None) -> list[str]:
    """Parallelism, precision and overrides of the megatron section."""
    err = []
    mg = cfg.megatron
    for key in ("tensor_parallel", "pipeline_parallel", "context_parallel", "expert_parallel"):
        if getattr(mg, key) < 1:
            err.append(f"megatron.{key}: must be at least 1, not {getattr(mg, key)}")
    if mg.virtual_pipeline is not None and (mg.virtual_pipeline < 1 or mg.pipeline_parallel < 2):
        err.append(f"megatron.virtual_pipeline: {mg.virtual_pipeline} needs megatron.pipeline_parallel > 1 "
                   f"(it is {mg.pipeline_parallel}) and a value of at least 1")
    if mg.sequence_parallel and mg.tensor_parallel < 2:
        err.append("megatron.sequence_parallel: needs megatron.tensor_parallel > 1 (sequence parallelism splits "
                   "over the tensor-parallel ranks)")
    if mg.context_parallel > 1 and cfg.data.seq_length % (2 * mg.context_parallel):
        err.append(f"megatron.context_parallel: data.seq_length ({cfg.data.seq_length}) must be divisible by "
                   f"2 × context_parallel = {2 * mg.context_parallel}")
    if mg.precision == "fp8" and cfg.model.dtype == "fp32":
        err.append("megatron.precision: fp8 together with model.dtype: fp32; choose one")
    if mg.precision == "fp8" and mg.transformer_impl == "local":
        err.append("megatron.precision: fp8 needs megatron.transformer_impl: transformer_engine")
    if mg.context_parallel > 1 and mg.transformer_impl == "local":  # Core's DotProductAttention asserts cp == 1
        err.append("megatron.context_parallel: needs megatron.transformer_impl: transformer_engine (context "
                   "parallelism is only in Transformer Engine's attention)")
    if mg.overlap_param_gather and not mg.distributed_optimizer:
        err.append("megatron.overlap_param_gather: needs megatron.distributed_optimizer: true (set "
                   "overlap_param_gather: false without it)")
    for key in mg.overrides:
        if key.split(".", 1)[0] not in _MEGATRON_OVERRIDE_SECTIONS or "." not in key:
            err.append(f"megatron.overrides.{key}: expected SECTION.field with SECTION one of "
                       f"{', '.join(_MEGATRON_OVERRIDE_SECTIONS)}")
    model_parallel = _megatron_model_parallel(mg)
    if world_size is not None and world_size % model_parallel:
        err.append(f"megatron: the world size {world_size} is not divisible by tensor × pipeline × context parallel "
                   f"= {mg.tensor_parallel} × {mg.pipeline_parallel} × {mg.context_parallel}")
    elif world_size is not None and cfg.parallel.data_parallel_size is not None \
            and cfg.parallel.data_parallel_size != world_size // model_parallel:
        err.append(f"parallel.data_parallel_size: {cfg.parallel.data_parallel_size} differs from world size / "
                   f"(tensor × pipeline × context parallel) = {world_size // model_parallel}")
    return err


def _megatron_cannot_honour(cfg: KeizokuConfig) -> list[str]:
    """Settings of the shared sections (or engine torch's) that engine megatron does not offer."""
    err, mg = [], cfg.megatron
    if cfg.model.full_recompute_layers and cfg.model.activation_checkpointing == "selective":
        err.append("model.full_recompute_layers: with activation_checkpointing: selective is engine: torch only "
                   "(Megatron recomputes either selectively or whole layers)")
    if cfg.optim.state_dtype == "bf16" and not mg.distributed_optimizer:
        err.append("optim.state_dtype: bf16 needs megatron.distributed_optimizer: true (Megatron's precision-aware "
                   "optimizer works on the distributed optimizer's shards)")
    if cfg.model.fp8 != "none":
        err.append("model.fp8: engine: torch only; with engine: megatron use megatron.precision: fp8")
    if cfg.logging.profile_step:
        err.append("logging.profile_step: engine: torch only (Megatron-Bridge has its own ProfilingConfig)")
    if cfg.parallel.reshard_after_forward is not None or cfg.parallel.grad_accumulation != "auto" or \
            cfg.parallel.reduce_dtype != "fp32":
        err.append("parallel.reshard_after_forward / grad_accumulation / reduce_dtype: engine: torch only (Megatron "
                   "accumulates in its DDP's fp32 gradient buffer; see megatron.distributed_optimizer)")
    if cfg.model.compile:
        err.append("model.compile: not available with engine: megatron (Megatron-Core uses its own fused kernels)")
    if cfg.train.device == "cpu":
        err.append("train.device: cpu — engine: megatron runs on CUDA GPUs only; use engine: torch on a CPU")
    if cfg.parallel.backend == "gloo":
        err.append("parallel.backend: gloo — engine: megatron needs nccl (or auto)")
    if cfg.train.on_nan == "skip":
        err.append("train.on_nan: skip is not available with engine: megatron (Megatron stops on a NaN loss)")
    if not cfg.checkpoint.save_at_end:
        err.append("checkpoint.save_at_end: false is not available with engine: megatron (Megatron-Bridge always "
                   "saves the last step)")
    return err


_MEGATRON_OVERRIDE_SECTIONS = ("model", "train", "optimizer", "scheduler", "ddp", "dataset", "checkpoint", "logger",
                               "dist", "rng")


def _check_entries(name: str, entries: list[DatasetEntry], budgets_allowed: bool) -> list[str]:
    err = []
    kinds = set()
    for i, entry in enumerate(entries):
        key = f"{name}[{i}]"
        if entry.weight is not None and entry.tokens is not None:
            err.append(f"{key}: give weight or tokens, not both")
        if entry.weight is not None:
            kinds.add("weight")
            if not entry.weight > 0:
                err.append(f"{key}.weight: must be > 0, not {entry.weight}")
        if entry.tokens is not None:
            kinds.add("tokens")
            if not budgets_allowed:
                err.append(f"{key}.tokens: token budgets apply to data.blend only")
            elif entry.tokens < 1:
                err.append(f"{key}.tokens: must be at least 1, not {entry.tokens}")
    if len(kinds) > 1:
        err.append(f"{name}: mixes weights and token budgets; use one kind for all entries")
    return err


def to_yaml(cfg: KeizokuConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


# what a run that has trained may change freely: how it runs, evaluates, logs and saves, not what it trains (prefixes)
FREE_TO_CHANGE = (
    "model.hf_path", "model.tokenizer",  # the run reads its own copy of both (base_model); a moved model is the same
    "model.attn_implementation", "model.activation_checkpointing", "model.full_recompute_layers", "model.compile",
    "data.validation", "data.cache_dir", "data.num_workers", "data.require_run_tokenizer",
    "train.micro_batch_size", "train.device", "train.loss_chunk_tokens", "train.on_nan", "optim.fused",
    "checkpoint.", "eval.", "logging.", "parallel.",
    "megatron.tensor_parallel", "megatron.pipeline_parallel", "megatron.virtual_pipeline", "megatron.context_parallel",
    "megatron.sequence_parallel", "megatron.expert_parallel", "megatron.distributed_optimizer", "megatron.overlap_",
    "megatron.transformer_impl", "megatron.async_save", "megatron.import_dir",
)


class RunChangeError(ConfigError):
    """A start that would change what a run that has trained trains, without ``--allow-changes``."""


def save_resolved(cfg: KeizokuConfig, run_dir: str | os.PathLike, *, allow_changes: bool = False,
                  has_trained: bool = False, argv: list[str] | None = None, act: str | None = None) -> Path:
    """Write RUN_DIR/config.yaml (atomically): exactly what the run uses, and append this start to
    RUN_DIR/config-history.jsonl (time, command line, settings changed). A run that ``has_trained`` (a complete
    checkpoint) keeps its definition: a change outside ``FREE_TO_CHANGE`` raises RunChangeError unless
    ``allow_changes`` (recorded). ``act``: a start that is not training (``extend``), recorded as such."""
    import json
    import sys
    import time

    run = RunDir(run_dir)
    resolved = to_yaml(cfg)
    try:
        before = yaml.safe_load(run.config.read_text()) if run.config.exists() else None
    except yaml.YAMLError:
        before = None  # unreadable: replaced, the history says so
    changes = run_changes(before, yaml.safe_load(resolved)) if isinstance(before, dict) else {}
    if changes and has_trained and not allow_changes:
        said = ", ".join(f"{k} {_show(old)} → {_show(new)}" for k, (old, new) in changes.items())
        hint = (" (another length reshapes the LR schedule from its first step; to train on after the end, use "
                "keizoku extend RUN_DIR --steps N)" if {"train.max_steps", "train.max_tokens"} & set(changes) else "")
        raise RunChangeError(f"{run.config}: this run has trained, and this start changes what it trains: {said}"
                             f"{hint}. Use a new run_dir, or add --allow-changes to apply the change (recorded in "
                             f"{run.history})")
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "argv": argv if argv is not None else
              sys.argv[1:], "changes": {k: list(v) for k, v in changes.items()}, "allowed": bool(changes)
              and allow_changes, "first": before is None}
    if act:
        record["act"] = act
    run.path.mkdir(parents=True, exist_ok=True)
    with open(run.history, "a") as f:
        f.write(json.dumps(record, default=str) + "\n")
    return write_atomic(run.config, resolved)


def run_changes(before: dict, after: dict) -> dict[str, tuple[Any, Any]]:
    """{key: (before, after)} of the settings outside ``FREE_TO_CHANGE`` that differ (keys in both)."""
    old, new = _flat(before), _flat(after)
    return {k: (old[k], new[k]) for k in sorted(old.keys() & new.keys())
            if old[k] != new[k] and not k.startswith(FREE_TO_CHANGE)}


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value and key != "overrides":
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _show(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10**9).strip()
    return text[:-4] if text.endswith("\n...") else text.removesuffix("...").strip()


def defaults_yaml() -> str:
    """Every setting with its default and help text, as YAML that ``load_config`` reads back unchanged."""
    lines = ["# keizoku configuration: every setting, its default and what it means.",
             "# Use: keizoku train CONFIG.yaml [key.path=value ...] (command line > this file > defaults).", ""]
    _emit(KeizokuConfig(), lines, 0)
    return "\n".join(lines) + "\n"


def _emit(obj, lines: list[str], indent: int) -> None:
    pad = "  " * indent
    for f in fields(obj):
        value = getattr(obj, f.name)
        help_text = f.metadata.get("help", "")
        for chunk in _wrap(help_text, 110 - len(pad)):
            lines.append(f"{pad}# {chunk}")
        if is_dataclass(value):
            lines.append(f"{pad}{f.name}:")
            _emit(value, lines, indent + 1)
            if indent == 0:
                lines.append("")
        else:
            rendered = OmegaConf.to_yaml(OmegaConf.create({f.name: _plain(value)})).rstrip("\n")
            lines.extend(pad + ln for ln in rendered.splitlines())
            if f.name == "blend" and not value:
                lines.append(f"{pad}# e.g. blend: [{{path: tokenized/ja/part-0_text_document, weight: 0.9}}, "
                             "{path: tokenized/en, weight: 0.1}]")


def _plain(value):
    if isinstance(value, tuple):
        return list(value)
    return value


def _wrap(text: str, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width) if text else []
