"""The torch engine: continual pre-training of a Hugging Face model with FSDP2.

Reads top to bottom: set up the process group and device, load the pretrained model, shard it (FSDP2, per
decoder layer then the root), build optimizer, schedule and data (megatron-core GPTDataset), resume from the
latest checkpoint, then loop: gradient accumulation over micro batches, clipping, a step, metrics,
evaluation, checkpoints. SIGTERM/SIGUSR1/SIGUSR2 (what schedulers send before the walltime kill; Grid
Engine's -notify sends SIGUSR2) finish the step, save and exit with ``EXIT_PREEMPTED``.

Runs the same on a laptop CPU (one process, gloo) and under ``torchrun`` on many GPUs and nodes (NCCL).
"""

from __future__ import annotations

import json
import math
import os
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from keizoku.config import (KeizokuConfig, reshard_after_forward, save_resolved, unsharded_grad_accumulation,
                            validate)
from keizoku.data import blend
from keizoku.engines.torch import float8, profiling, recompute
from keizoku.engines.torch.loss import CausalLMWithLoss, chunking_unsupported
from keizoku.train import checkpoint
from keizoku.train.model import load_model
from keizoku.train.optim import adamw
from keizoku.train.schedule import lambda_for

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_PREEMPTED = 3  # stopped on a signal after saving: resubmit to continue


class TrainingError(RuntimeError):
    pass


@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device


def setup_distributed(cfg: KeizokuConfig) -> Dist:
    want_cuda = cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available())
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if want_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    backend = cfg.parallel.backend if cfg.parallel.backend != "auto" else ("nccl" if want_cuda else "gloo")
    if not dist.is_initialized():
        bind = {"device_id": device} if device.type == "cuda" else {}  # NCCL: no guessing rank -> GPU
        if "RANK" in os.environ:  # torchrun, or keizoku launch
            dist.init_process_group(backend, **bind)
        else:  # one process: a private store
            store = tempfile.mkdtemp(prefix="keizoku-pg-")
            dist.init_process_group(backend, init_method=f"file://{store}/store", rank=0, world_size=1, **bind)
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, device)


class _StopRequested:
    """Records SIGTERM/SIGUSR1/SIGUSR2; the loop stops at the end of the step."""

    def __init__(self):
        self.signal: int | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signal = signum


class _Metrics:
    """Console, RUN_DIR/metrics.jsonl and TensorBoard, on rank 0."""

    def __init__(self, cfg: KeizokuConfig, run_dir: Path, rank: int):
        self.rank = rank
        self.file = open(run_dir / "metrics.jsonl", "a") if rank == 0 else None
        self.tb = None
        if rank == 0 and cfg.logging.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                print("keizoku: tensorboard is not installed; metrics go to metrics.jsonl only", flush=True)
        self.wandb = None
        if rank == 0 and cfg.logging.wandb:
            try:
                import wandb
            except ImportError:
                raise RuntimeError("logging.wandb: true, but wandb is not installed (pip install wandb)") from None
            from omegaconf import OmegaConf

            self.wandb = wandb.init(project=cfg.logging.wandb_project, dir=str(run_dir), resume="allow",
                                    config=OmegaConf.to_container(OmegaConf.structured(cfg)))

    def log(self, kind: str, step: int, values: dict) -> None:
        if self.rank != 0:
            return
        record = {"kind": kind, "step": step, **values}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        shown = "  ".join(f"{k} {_fmt(v)}" for k, v in values.items())
        print(f"[{kind} step {step}] {shown}", flush=True)
        scalars = {f"{kind}/{k}": v for k, v in values.items() if isinstance(v, (int, float))}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.tb:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:,.0f}"
    return str(v)


def run(cfg: KeizokuConfig) -> int:
    # growable allocator segments: large models at the edge of GPU memory fragment it less (read when CUDA starts)
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    d = setup_distributed(cfg)
    try:
        return _train(cfg, d)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: KeizokuConfig, d: Dist) -> int:
    errors = validate(cfg, world_size=d.world)
    if errors:
        if d.rank == 0:
            print("\n".join(f"error: {e}" for e in errors), flush=True)
        return EXIT_CONFIG
    run_dir = Path(cfg.run_dir)
    if d.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_resolved(cfg, run_dir)
    dist.barrier()
    stop = _StopRequested()
    metrics = _Metrics(cfg, run_dir, d.rank)
    try:
        return _loop(cfg, d, run_dir, stop, metrics)
    finally:
        metrics.close()


def _loop(cfg: KeizokuConfig, d: Dist, run_dir: Path, stop: _StopRequested, metrics: _Metrics) -> int:
    t, seq = cfg.train, cfg.data.seq_length
    cuda = d.device.type == "cuda"
    bf16 = cfg.model.dtype == "bf16" or (cfg.model.dtype == "auto" and cuda)

    reshard = reshard_after_forward(cfg.parallel, d.world)
    # unsharded: one reduce-scatter a step, not one per micro batch
    unsharded_accumulation = unsharded_grad_accumulation(cfg.parallel, d.world)
    model = load_model(cfg.model, torch.float32, seed=t.seed, device=d.device).to(d.device)  # fp32 master weights
    flops_token, peak = flops_per_token(model, seq), peak_flops(d.device)
    compile = cuda if cfg.model.compile is None else cfg.model.compile
    # on a CPU the chunked loss measured ~30% slower than F.cross_entropy on full logits (bench/quickstart)
    chunk = (2048 if cuda else 0) if t.loss_chunk_tokens is None else t.loss_chunk_tokens
    why_not = chunking_unsupported(model) if chunk else None
    if why_not:
        chunk = 0
        if d.rank == 0:
            print(f"keizoku: train.loss_chunk_tokens: {type(model).__name__}: {why_not}; using full logits", flush=True)
    # the model with its loss: forward returns the summed token loss; checkpoints and the optimizer see `model`
    lm_loss = CausalLMWithLoss(model, chunk, compile)
    fp8_all_gather = cuda and d.world > 1  # FSDP2 gathers FP8 weights (half the traffic); gloo has no FP8
    if cfg.model.fp8 != "none":
        if cuda and torch.cuda.get_device_capability(d.device) < (8, 9):
            raise TrainingError(f"model.fp8: {torch.cuda.get_device_name(d.device)} has no FP8 matmuls (needs "
                                "compute capability 8.9+: Ada, Hopper or newer)")
        try:
            n, linear = float8.convert(_decoder_layers(model), cfg.model.fp8, fp8_all_gather, cfg.model.fp8_layers)
        except float8.Float8Unavailable as e:
            raise TrainingError(str(e)) from None
        if d.rank == 0:
            print(f"keizoku: model.fp8: {cfg.model.fp8}: {n} of {linear} linear layers compute in FP8"
                  + (f" (the other {linear - n} stay in bf16, too small to gain from it; model.fp8_layers=all "
                     "converts them)" if n < linear and cfg.model.fp8_layers == "auto" else ""), flush=True)
    _shard(lm_loss, cfg, d, bf16, compile, reshard)
    optimizer = adamw(model, cfg.optim, d.device.type)
    steps, total_samples = blend.samples_for(t.max_steps, t.max_tokens, t.global_batch_size, seq)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda_for(steps, cfg.optim, cfg.schedule))

    accum = t.global_batch_size // (t.micro_batch_size * d.world)
    eval_samples = cfg.eval.batches * t.micro_batch_size * d.world
    train_ds, valid = _datasets(cfg, run_dir, total_samples, eval_samples)

    step, consumed, tokens_seen = 0, 0, 0
    ckpt_root = run_dir / "checkpoints"
    resume = checkpoint.latest(ckpt_root) if cfg.checkpoint.resume == "auto" else \
        None if cfg.checkpoint.resume == "none" else Path(cfg.checkpoint.resume)
    if resume is not None:
        state = checkpoint.load(resume, model, optimizer)
        step, consumed, tokens_seen = state["step"], state["consumed_samples"], state["consumed_tokens"]
        scheduler.load_state_dict(state["scheduler"])
        if d.rank == 0:
            print(f"keizoku: resumed from {resume} at step {step} ({consumed:,} samples)", flush=True)
    if step >= steps:
        if d.rank == 0:
            print(f"keizoku: training is complete ({step} of {steps} steps)", flush=True)
        return EXIT_OK

    def save(at: int) -> None:
        checkpoint.save(ckpt_root, at, model, optimizer, {
            "step": at, "consumed_samples": consumed, "consumed_tokens": tokens_seen,
            "scheduler": scheduler.state_dict(), "steps": steps}, cfg.checkpoint.keep_last)

    if cfg.eval.at_start and valid and step == 0:
        metrics.log("eval", step, _evaluate(lm_loss, valid, cfg, d, eval_samples))

    loader = _loader(train_ds, blend.SampleSampler(total_samples, consumed, t.micro_batch_size, d.rank, d.world),
                     cfg.data.num_workers, cuda)
    batches = iter(loader)
    if resume is not None:  # after the loader's seed draw: the next step sees the uninterrupted run's RNG
        checkpoint.restore_rng(resume)
    tokens_per_step = t.global_batch_size * seq
    warned_retries = False
    while step < steps:
        prof = profiling.start(cfg.logging, step + 1, d.rank, d.device)
        start = time.perf_counter()
        data_time = 0.0
        loss_sum = torch.zeros((), device=d.device)
        for micro in range(accum):
            last = micro == accum - 1
            # without reshard_after_forward all weights are gathered at each backward's start anyway: they stay so
            # until the step's last backward (the next forward's gathers would queue behind this backward's
            # reduce-scatters), and that forward need not wait for the last one (the output layer's, 1 GiB at 8B)
            lm_loss.set_reshard_after_backward(last or reshard)
            lm_loss.set_is_last_backward(last or reshard)
            if unsharded_accumulation:
                lm_loss.set_requires_gradient_sync(last)
            t0 = time.perf_counter()
            batch = next(batches)
            data_time += time.perf_counter() - t0
            tokens = batch["tokens"].to(d.device, non_blocking=True)
            labels = batch["labels"].to(d.device, non_blocking=True)
            with torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=bf16 and not cuda):
                losses = lm_loss(tokens, labels)
            (losses / (accum * tokens.numel())).backward()  # FSDP averages over ranks: the global mean
            loss_sum += losses.detach()
        # one host sync a step: the summed loss, the gradient norm and whether any rank was asked to stop come back
        # together (each read on its own drains the GPU's queue, which then idles while the CPU catches up). A
        # signal arriving after this point stops the run at the end of the next step.
        totals = torch.stack([loss_sum, torch.full((), float(stop.signal is not None), device=d.device)])  # no copy
        dist.all_reduce(totals)
        loss_total, stop_votes, grad_norm = torch.cat([totals, _clip(model, cfg.optim.grad_clip).view(1)]).tolist()
        loss = loss_total / tokens_per_step
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            if t.on_nan == "stop":
                raise TrainingError(f"step {step + 1}: loss {loss}, grad norm {grad_norm}: not finite; stopping "
                                    f"(the last checkpoint is untouched; train.on_nan: skip skips such steps)")
            optimizer.zero_grad(set_to_none=True)
            if d.rank == 0:
                print(f"keizoku: step {step + 1}: non-finite loss/gradient, step skipped", flush=True)
        else:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if cfg.model.fp8 != "none":
                float8.after_optimizer_step(lm_loss, cfg.model.fp8, fp8_all_gather)
        scheduler.step()
        step += 1
        consumed += t.global_batch_size
        tokens_seen += tokens_per_step
        elapsed = time.perf_counter() - start
        if prof is not None:
            table = profiling.finish(prof, run_dir, d.rank, step, d.device)
            if d.rank == min(cfg.logging.profile_ranks):
                print(f"keizoku: step {step} profiled: {table.parent}/", flush=True)
        if step % cfg.logging.interval == 0 or step == steps:
            values = {"loss": loss, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                      "tokens_per_s": tokens_per_step / elapsed, "tokens_per_s_per_device": tokens_per_step / elapsed / d.world,
                      "step_s": elapsed, "data_share": data_time / elapsed, "tokens": tokens_seen}
            if cuda:
                values["memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
                # each retry frees the allocator's cache and synchronises: a run at the card's limit slows down
                values["memory_retries"] = torch.cuda.memory_stats().get("num_alloc_retries", 0)
                if values["memory_retries"] and not warned_retries and d.rank == 0:
                    warned_retries = True
                    print(f"keizoku: step {step}: the CUDA allocator ran out of cached memory and had to free and "
                          "retry (memory_retries in the metrics); steps slow down at the card's limit: recompute "
                          "more (model.full_recompute_layers, model.activation_checkpointing) or use "
                          "optim.state_dtype: bf16", flush=True)
            if peak:
                values["mfu"] = flops_token * tokens_per_step / elapsed / d.world / peak
            metrics.log("train", step, values)
        if valid and cfg.eval.interval and step % cfg.eval.interval == 0 and step < steps:
            metrics.log("eval", step, _evaluate(lm_loss, valid, cfg, d, eval_samples))
        stopping = stop_votes > 0
        if stopping or step == steps and cfg.checkpoint.save_at_end or \
                cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0:
            save(step)
        if stopping:
            if d.rank == 0:
                print(f"keizoku: signal {stop.signal}: saved step {step}; resubmit to continue", flush=True)
            return EXIT_PREEMPTED
    if valid:
        metrics.log("eval", step, _evaluate(lm_loss, valid, cfg, d, eval_samples))
    return EXIT_OK


# dense BF16 peak per GPU, TFLOP/s (MFU's denominator)
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "H800": 989.4, "A100": 312.0, "A800": 312.0, "GH200": 989.4}


def flops_per_token(model, seq_length: int) -> float:
    """Training FLOPs per token: 6·N + 12·L·H·S (N: parameters except the input embedding, output layer
    included; L layers, H hidden size, S sequence length; the second term is attention)."""
    cfg = model.config
    embed = model.get_input_embeddings().weight
    n = sum(p.numel() for p in model.parameters()) - embed.numel()
    if getattr(cfg, "tie_word_embeddings", False):
        n += embed.numel()  # the tied output layer still does its matmul
    return 6 * n + 12 * cfg.num_hidden_layers * cfg.hidden_size * seq_length


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tf * 1e12 for key, tf in PEAK_BF16_TFLOPS.items() if key in name), None)


def _shard(model: CausalLMWithLoss, cfg: KeizokuConfig, d: Dist, bf16: bool, compile: bool, reshard: bool) -> None:
    """FSDP2 per decoder layer (each with its activation checkpointing, optionally compiled), the input embedding
    on its own when it is not tied to the output layer, then the root: the wrapper, so the final norm and output
    layer (and a tied embedding) stay gathered from the body's forward through the loss."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(d.device.type, (d.world,))
    reduce_dtype = torch.bfloat16 if cfg.parallel.reduce_dtype == "bf16" else torch.float32
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=reduce_dtype) \
        if bf16 and d.device.type == "cuda" else MixedPrecisionPolicy()
    layers = _decoder_layers(model.lm)
    try:
        modes = recompute.layer_modes(len(layers), cfg.model.activation_checkpointing, cfg.model.full_recompute_layers)
    except ValueError as e:
        raise TrainingError(str(e)) from None
    for i, (layer, mode) in enumerate(zip(layers, modes)):
        layer = layers[i] = recompute.wrap(layer, mode)
        if compile:
            layer.compile()
        fully_shard(layer, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard)
    embedding, output = model.lm.get_input_embeddings(), model.lm.get_output_embeddings()
    if output is None or embedding.weight is not output.weight:
        # its own unit: the gathered input embedding (1 GiB for Llama-3.1-8B) is not held from forward to backward
        fully_shard(embedding, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard)


def _decoder_layers(model) -> torch.nn.ModuleList:
    base = getattr(model, model.base_model_prefix, model)
    layers = getattr(base, "layers", None) or getattr(base, "h", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise TrainingError(f"{type(model).__name__}: cannot find its decoder layers to shard")
    return layers


def _clip(model, max_norm: float) -> torch.Tensor:
    """Clips the gradients to ``max_norm`` (0: no clipping); returns their norm before clipping, on the device."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else float("inf"))
    return (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).float()


def _datasets(cfg: KeizokuConfig, run_dir: Path, total_samples: int, eval_samples: int):
    from keizoku.data.tokenizer import load_tokenizer, tokenizer_fingerprint

    tok = load_tokenizer(cfg.model.tokenizer or cfg.model.hf_path)
    if tok.eos_id is None:
        raise TrainingError("model.tokenizer: the tokenizer has no eos token (the EOD that joins documents)")
    cache = cfg.data.cache_dir or str(run_dir / "data-cache")
    return blend.build(cfg.data, seq_length=cfg.data.seq_length, train_samples=total_samples,
                       eval_samples=eval_samples, eod=tok.eos_id, vocab_size=tok.vocab_size,
                       fingerprint=tokenizer_fingerprint(tok), cache_dir=cache)


def _loader(dataset, sampler, workers: int, pin: bool):
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers, pin_memory=pin,
                                       persistent_workers=workers > 0)


@torch.no_grad()
def _evaluate(model: CausalLMWithLoss, valid: dict, cfg: KeizokuConfig, d: Dist, eval_samples: int) -> dict:
    model.eval()
    out = {}
    for name, dataset in valid.items():
        total = torch.zeros(2, device=d.device)
        for batch in _loader(dataset, blend.SampleSampler(eval_samples, 0, cfg.train.micro_batch_size, d.rank, d.world),
                             0, False):
            tokens, labels = batch["tokens"].to(d.device), batch["labels"].to(d.device)
            total[0] += model(tokens, labels)
            total[1] += labels.numel()
        dist.all_reduce(total)
        loss = (total[0] / total[1]).item()
        out[f"{name}_loss"] = loss
        out[f"{name}_ppl"] = math.exp(min(loss, 50))
    model.train()
    return out
