"""engine: torch's training loop: continual pre-training of a Hugging Face model with FSDP2.

``train(cfg)`` starts the process group, checks the config against the world size, writes the run's resolved
config and runs a ``Trainer``, which reads top to bottom:

- ``__init__`` builds what a step needs, in order: the model (pretrained fp32 master weights; FP8, activation
  checkpointing, compilation and FSDP2 applied), AdamW and the learning-rate schedule (``keizoku.schedule``), the
  datasets (megatron-core ``GPTDataset``, ``keizoku.data.blend``), and restores the newest checkpoint;
- ``train_step``: gradient accumulation over micro batches, one host sync, clipping, the optimizer step;
- ``evaluate``: loss and perplexity of each validation set;
- ``save``: a checkpoint (``checkpoint``);
- ``train``: the loop — step, log, evaluate, save — until the last step or a stop request.

SIGTERM/SIGUSR1/SIGUSR2 (what schedulers send before the walltime kill; Grid Engine's -notify sends SIGUSR2)
finish the step, save and exit ``ExitCode.STOPPED``. Runs the same on a laptop CPU (one process, gloo) and under
``torchrun`` / ``keizoku launch`` on many GPUs and nodes (NCCL).
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist

from keizoku import base_model, downstream, preflight
from keizoku.config import (ConfigError, KeizokuConfig, reshard_after_forward, save_resolved,
                            unsharded_grad_accumulation, validate)
from keizoku.data import blend
from keizoku.errors import KeizokuError
from keizoku.engines.torch import TrainingError, checkpoint, float8, parallel, profiling, weights
from keizoku.engines.torch.loss import CausalLMWithLoss, chunking_unsupported, router_aux_loss_coef
from keizoku.engines.torch.model import decoder_layers, flops_per_token, load_model, model_skeleton, peak_flops
from keizoku.engines.torch.optim import adamw
from keizoku.engines.torch.parallel import Dist
from keizoku.metrics import MetricsLogger, eval_values
from keizoku.rundir import ExitCode, RunDir, latest_checkpoint, remove_staged
from keizoku.schedule import Segment, run_length, run_plan, write_plan


def train(cfg: KeizokuConfig, allow_changes: bool = False) -> int:
    # growable allocator segments: large models at the edge of GPU memory fragment it less (read when CUDA starts)
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    d = parallel.setup_distributed(cfg)
    try:
        errors = validate(cfg, world_size=d.world)
        if errors:
            if d.rank == 0:
                print("\n".join(f"error: {e}" for e in errors), file=sys.stderr, flush=True)
            return ExitCode.CONFIG
        run = RunDir(cfg.run_dir)
        problem = [None]
        if d.rank == 0:
            found = preflight.problems(cfg)  # before anything is written: a failed start leaves no run behind
            if found:
                problem = [(ExitCode.CONFIG, found)]
            else:
                try:
                    base_model.snapshot(cfg)  # the run's own copy of the base model's config and tokenizer
                    save_resolved(cfg, run.path, allow_changes=allow_changes,
                                  has_trained=latest_checkpoint(run.path) is not None)
                    remove_staged(run.checkpoints)  # what killed saves left; no save is in flight before the broadcast
                except ConfigError as e:
                    problem = [(ExitCode.CONFIG, [str(e)])]
                except KeizokuError as e:
                    problem = [(ExitCode.FAILED, [str(e)])]
        dist.broadcast_object_list(problem, src=0)  # also the barrier: the run directory is ready
        if problem[0]:
            code, messages = problem[0]
            if d.rank == 0:
                print("\n".join(f"error: {m}" for m in messages), file=sys.stderr, flush=True)
            return code
        stop = StopRequest(announce=d.rank == 0)
        metrics = _metrics_logger(cfg, run) if d.rank == 0 else None
        if metrics is not None:
            for line in run.where(cfg.checkpoint.interval, cfg.checkpoint.keep_last, cfg.checkpoint.save_at_end,
                                  metrics.tb is not None):
                print(f"keizoku: {line}", flush=True)
        # eval.downstream: rank 0 starts the evaluation of each due checkpoint once it is published (downstream.py)
        evaluate_after = (lambda step: downstream.after_checkpoint(cfg, run.path, step)) \
            if d.rank == 0 and cfg.eval.downstream.tasks else None
        checkpointer = checkpoint.Checkpointer(run.path, cfg.checkpoint.keep_last, cfg.checkpoint.background,
                                               on_published=evaluate_after)
        try:
            return Trainer(cfg, d, run, metrics, stop).train(checkpointer)
        finally:
            checkpointer.close()  # a save in flight is published (or fails) before the process group goes
            if metrics is not None:
                metrics.close()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class StopRequest:
    """Records SIGTERM/SIGUSR1/SIGUSR2 and a first Ctrl-C (SIGINT); the loop saves and stops at the end of the step
    in which every rank has heard of it. A second Ctrl-C aborts at once (KeyboardInterrupt: exit 130; the newest
    complete checkpoint is untouched)."""

    def __init__(self, announce: bool):
        self.signal: int | None = None
        self.announce = announce
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(sig, self._handle)
        signal.signal(signal.SIGINT, self._interrupt)

    def _handle(self, signum, frame) -> None:
        self.signal = signum

    def _interrupt(self, signum, frame) -> None:
        if self.signal == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum
        if self.announce:
            print("keizoku: Ctrl-C: saving at the end of this step, then stopping (Ctrl-C again aborts without saving)",
                  file=sys.stderr, flush=True)

    def name(self) -> str:
        return "Ctrl-C" if self.signal == signal.SIGINT else signal.Signals(self.signal).name


@dataclass
class TrainState:
    """Where the run is; saved in every checkpoint (with the LR scheduler's state and the run's length)."""

    step: int = 0
    consumed_samples: int = 0
    consumed_tokens: int = 0


@dataclass
class StepResult:
    loss: float  # the mean token loss (LM loss), without the router load-balancing loss
    grad_norm: float
    stop_requested: bool  # by any rank
    data_s: float  # waiting for batches
    lr: float  # the learning rate this step's update used
    router_aux_loss: float | None = None  # its mean over the step's micro batches of all ranks (MoE models)


class Trainer:
    def __init__(self, cfg: KeizokuConfig, d: Dist, run: RunDir, metrics: MetricsLogger | None, stop: StopRequest):
        self.cfg, self.d, self.run, self.metrics, self.stop = cfg, d, run, metrics, stop
        t = cfg.train
        self.cuda = d.device.type == "cuda"
        self.bf16 = cfg.model.dtype == "bf16" or (cfg.model.dtype == "auto" and self.cuda)
        self.length = run_length(cfg)
        self.plan = run_plan(cfg)  # its segments (phases, extensions) and the LR of every step
        self.phased = len(self.plan.segments) > 1 or self.plan.segments[0].kind != "run"
        self.tokens_per_step = t.global_batch_size * cfg.data.seq_length
        self.accumulation = t.global_batch_size // (t.micro_batch_size * d.world)
        self.reshard = reshard_after_forward(cfg.parallel, d.world)
        # unsharded: one reduce-scatter a step, not one per micro batch
        self.unsharded_accumulation = unsharded_grad_accumulation(cfg.parallel, d.world)
        self.fp8_all_gather = self.cuda and d.world > 1  # FSDP2 gathers FP8 weights (half the traffic); gloo has none
        self.eval_samples = cfg.eval.batches * t.micro_batch_size * d.world

        self.resumed_from = self._checkpoint_to_resume()
        self.model, self.lm_loss = self._build_model()
        # a batch with ids past the embedding: a clear error, not an index error in the embedding
        self.vocab_rows = self.model.get_input_embeddings().num_embeddings
        self.optimizer = adamw(self.model, cfg.optim, d.device.type)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.plan.factor_at)
        self.state = TrainState()
        self._restore()
        self.segment = self.plan.segment_at(self.state.step)
        self.train_data, self.valid = self._build_datasets(self.segment)
        self.warned_memory_retries = False

    # --- build --------------------------------------------------------------------------------------------------

    def _build_model(self) -> tuple[torch.nn.Module, CausalLMWithLoss]:
        """The model (fp32 master weights) and, around it, the module whose forward returns the summed token loss:
        the optimizer and checkpoints see the first, the steps run the second."""
        cfg, d = self.cfg, self.d
        # the pretrained weights are read only for a run's first start: a resumed run's checkpoint holds them
        source = cfg.model.hf_path if self.resumed_from is None and cfg.model.init == "pretrained" else None
        config_dir = base_model.model_dir(cfg)
        model = model_skeleton(cfg.model, config_dir)
        whole = weights.unsupported(model, source, cfg.model.trust_remote_code)
        if whole:
            self._say(f"model.hf_path: every rank loads the whole model (not only its shard): {whole}")
            # a resumed run's checkpoint overwrites every weight: the architecture alone, from the run's copy
            model_cfg = cfg.model if source is not None else replace(cfg.model, hf_path=config_dir, init="random")
            model = load_model(model_cfg, torch.float32, seed=cfg.train.seed, device=d.device).to(d.device)
        self.flops_per_token, self.peak_flops = flops_per_token(model, cfg.data.seq_length), peak_flops(d.device)
        compile = self.cuda if cfg.model.compile is None else cfg.model.compile
        self.router_aux_coef = self._router_aux_coef(model)
        lm_loss = CausalLMWithLoss(model, self._loss_chunk(model), compile, router_aux=self.router_aux_coef is not None)
        if cfg.model.fp8 != "none":
            self._convert_to_fp8(model)
        parallel.shard(lm_loss, cfg, d, self.bf16, compile, self.reshard)
        if not whole:
            self._fill_shards(model, lm_loss, source)
        return model, lm_loss

    def _fill_shards(self, model: torch.nn.Module, lm_loss: CausalLMWithLoss, source: str | None) -> None:
        """Allocate this rank's shards and fill them (``weights``): from ``source``'s safetensors, at random, or
        not at all for a resumed run, whose checkpoint fills them in ``_restore``."""
        weights.materialize(lm_loss, self.d.device)
        if source is not None:
            report = weights.load_pretrained(model, source)
            self._say(f"loaded {source}: this rank read {report.bytes_read / 2**30:.2f} of "
                      f"{report.bytes_total / 2**30:.2f} GiB (its shards) in {report.seconds:.1f} s")
        elif self.resumed_from is None:
            weights.init_random(model, self.cfg.train.seed, self.d.device)
        weights.init_buffers(model, parameters_filled=self.resumed_from is None)

    def _loss_chunk(self, model: torch.nn.Module) -> int:
        """train.loss_chunk_tokens, resolved: on a CPU the chunked loss measured ~30% slower than F.cross_entropy on
        full logits (bench/quickstart); 0 for models whose output layer it cannot stand in for."""
        chunk = self.cfg.train.loss_chunk_tokens
        chunk = (2048 if self.cuda else 0) if chunk is None else chunk
        why_not = chunking_unsupported(model) if chunk else None
        if why_not:
            self._say(f"train.loss_chunk_tokens: {type(model).__name__}: {why_not}; using full logits")
            return 0
        return chunk

    def _router_aux_coef(self, model: torch.nn.Module) -> float | None:
        """model.router_aux_loss_coef, resolved against the model (``loss.router_aux_loss_coef``)."""
        try:
            coef = router_aux_loss_coef(model, self.cfg.model.router_aux_loss_coef)
        except ValueError as e:
            raise TrainingError(str(e)) from None
        if coef is not None:
            self._say(f"model.router_aux_loss_coef: {type(model).__name__}: the loss includes its router "
                      f"load-balancing loss × {coef:g} (router_aux_loss in the metrics)")
        return coef

    def _convert_to_fp8(self, model: torch.nn.Module) -> None:
        fp8, d = self.cfg.model, self.d
        if self.cuda and torch.cuda.get_device_capability(d.device) < (8, 9):
            raise TrainingError(f"model.fp8: {torch.cuda.get_device_name(d.device)} has no FP8 matmuls (needs "
                                "compute capability 8.9+: Ada, Hopper or newer)")
        n, linear = float8.convert(decoder_layers(model), fp8.fp8, self.fp8_all_gather, fp8.fp8_layers)
        kept = linear - n
        self._say(f"model.fp8: {fp8.fp8}: {n} of {linear} linear layers compute in FP8"
                  + (f" (the other {kept} stay in bf16, too small to gain from it; model.fp8_layers=all converts "
                     "them)" if kept and fp8.fp8_layers == "auto" else ""))

    def _build_datasets(self, segment: Segment) -> tuple[torch.utils.data.Dataset, dict]:
        """(training samples, {validation set: samples}) of a segment of the run (the run itself, a phase, an
        extension), built by megatron-core from its blend with its own seed (data.seed + its index). Its steps
        train on the samples the run's consumed-sample count indexes, [first step × batch, end step × batch), as
        Megatron-Bridge reads them when engine megatron runs the segment as its own run from the last one's
        checkpoint: both engines draw the same samples."""
        cfg = self.cfg
        return blend.build(blend.segment_data(cfg, segment), seq_length=cfg.data.seq_length,
                           train_samples=segment.end_step * cfg.train.global_batch_size,
                           budget_tokens=segment.steps * self.tokens_per_step, eval_samples=self.eval_samples,
                           tokenizer=blend.run_tokenizer(cfg), cache_dir=blend.sample_cache_dir(cfg),
                           key=segment.blend_key, seed=cfg.data.seed + segment.index)

    def _segment_batches(self):
        """The current segment's micro batches from where the run is. Making the loader draws a seed from the RNG:
        drawn on a copy, so that a run that resumes here and one that went on from the segment before take their
        next step with the same RNG."""
        loader = self._loader(self.train_data, self.state.consumed_samples,
                              self.segment.end_step * self.cfg.train.global_batch_size, self.cfg.data.num_workers,
                              self.cuda)
        with torch.random.fork_rng(devices=[]):
            return iter(loader)

    def _checkpoint_to_resume(self) -> Path | None:
        """The checkpoint ``checkpoint.resume`` names: the run's newest complete one (auto), none, or a path."""
        resume = self.cfg.checkpoint.resume
        if resume == "none":
            return None
        if resume == "auto":
            newest = latest_checkpoint(self.run.path, engine="torch")
            return newest.path if newest is not None else None
        return Path(resume)

    def _restore(self) -> None:
        """Model, optimizer, scheduler and TrainState from the checkpoint to resume from, if any."""
        if self.resumed_from is None:
            return
        saved = checkpoint.restore(self.resumed_from, self.model, self.optimizer)
        self.state = TrainState(saved["step"], saved["consumed_samples"], saved["consumed_tokens"])
        self.scheduler.load_state_dict(saved["scheduler"])
        # the rate of the next step as the plan says: the same value when the plan is the saved run's; the plan's
        # own where the run has been extended since (the checkpoint's is where the run ended)
        rates = [group["initial_lr"] * self.plan.factor_at(self.state.step) for group in self.optimizer.param_groups]
        for group, rate in zip(self.optimizer.param_groups, rates):
            group["lr"] = rate
        self.scheduler._last_lr = rates
        if self.metrics is not None:
            self.metrics.resume_at(self.state.step)  # the steps after it are replayed: one record each
        self._say(f"resumed from {self.resumed_from} at step {self.state.step} "
                  f"({self.state.consumed_samples:,} samples)")

    def _loader(self, dataset, consumed: int, total: int, workers: int, pin: bool):
        sampler = blend.SampleSampler(total, consumed, self.cfg.train.micro_batch_size, self.d.rank, self.d.world)
        return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers, pin_memory=pin,
                                           persistent_workers=workers > 0)

    # --- one step -----------------------------------------------------------------------------------------------

    def train_step(self, batches) -> StepResult:
        """One optimizer step over the step's micro batches of this rank."""
        device, data_s = self.d.device, 0.0
        loss_sum = torch.zeros((), device=device)
        aux_sum = torch.zeros((), device=device)  # router load-balancing loss of each micro batch, summed
        for micro in range(self.accumulation):
            parallel.prepare_micro_batch(self.lm_loss, micro == self.accumulation - 1, self.reshard,
                                         self.unsharded_accumulation)
            t0 = time.perf_counter()
            batch = next(batches)
            data_s += time.perf_counter() - t0
            preflight.check_token_ids(batch["tokens"], self.vocab_rows,
                                      f"data.blend: a sample of step {self.state.step + 1}")
            tokens = batch["tokens"].to(device, non_blocking=True)
            labels = batch["labels"].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bf16 and not self.cuda):
                losses = self.lm_loss(tokens, labels)
            aux = None
            if self.router_aux_coef is not None:
                losses, aux = losses
                aux_sum += aux.detach()
            objective = losses / (self.accumulation * tokens.numel())
            if aux is not None:
                # the micro batch's load-balancing loss (transformers': over its tokens) weighted as its mean token
                # loss is: the step's objective is the mean of both over micro batches and ranks
                objective = objective + self.router_aux_coef * aux / self.accumulation
            objective.backward()  # FSDP averages over ranks: the global mean
            loss_sum += losses.detach()
        loss, aux, grad_norm, stop = self._reduce(loss_sum, aux_sum)
        router_aux = aux if self.router_aux_coef is not None else None
        lr = self.scheduler.get_last_lr()[0]  # the schedule moves on below: this is the step's own
        if math.isfinite(loss) and math.isfinite(aux) and math.isfinite(grad_norm):
            self.optimizer.step()
            if self.cfg.model.fp8 != "none":
                float8.after_optimizer_step(self.lm_loss, self.cfg.model.fp8, self.fp8_all_gather)
        else:
            self._skip_step(loss, grad_norm)
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.state.step += 1
        self.state.consumed_samples += self.cfg.train.global_batch_size
        self.state.consumed_tokens += self.tokens_per_step
        return StepResult(loss, grad_norm, stop, data_s, lr, router_aux)

    def _reduce(self, loss_sum: torch.Tensor, aux_sum: torch.Tensor) -> tuple[float, float, float, bool]:
        """(mean token loss over all ranks, mean router load-balancing loss of their micro batches (0 without),
        gradient norm before clipping, whether any rank was asked to stop), in one host sync a step: each read on
        its own drains the GPU's queue, which then idles while the CPU catches up. A signal arriving after this
        point stops the run at the end of the next step."""
        asked = torch.full((), float(self.stop.signal is not None), device=self.d.device)
        totals = torch.stack([loss_sum, asked, aux_sum])
        dist.all_reduce(totals)
        grad_norm = parallel.clip_grad_norm(self.model, self.cfg.optim.grad_clip)
        loss_total, stop_votes, aux_total, norm = torch.cat([totals, grad_norm.view(1)]).tolist()
        return (loss_total / self.tokens_per_step, aux_total / (self.accumulation * self.d.world), norm,
                stop_votes > 0)

    def _skip_step(self, loss: float, grad_norm: float) -> None:
        step = self.state.step + 1
        if self.cfg.train.on_nan == "stop":
            raise TrainingError(f"step {step}: loss {loss}, grad norm {grad_norm}: not finite; stopping (the last "
                                "checkpoint is untouched; train.on_nan: skip skips such steps)")
        self._say(f"step {step}: non-finite loss/gradient, step skipped")

    # --- evaluation ---------------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Loss and perplexity of every validation set, on its first ``eval.batches`` micro batches per rank (the
        LM loss: without a router load-balancing loss)."""
        self.lm_loss.eval()
        losses = {}
        for name, dataset in self.valid.items():
            total = torch.zeros(2, device=self.d.device)
            for batch in self._loader(dataset, 0, self.eval_samples, 0, False):
                preflight.check_token_ids(batch["tokens"], self.vocab_rows, f"data.validation.{name}: a sample")
                tokens, labels = batch["tokens"].to(self.d.device), batch["labels"].to(self.d.device)
                loss = self.lm_loss(tokens, labels)
                total[0] += loss[0] if self.router_aux_coef is not None else loss  # the LM loss alone
                total[1] += labels.numel()
            dist.all_reduce(total)
            losses[name] = (total[0] / total[1]).item()
        self.lm_loss.train()
        return eval_values(losses)

    # --- checkpoint ---------------------------------------------------------------------------------------------

    def save(self) -> None:
        """Start saving this step (``checkpoint.Checkpointer``): returns once the state is copied; it is written and
        published while training goes on."""
        state = {**asdict(self.state), "scheduler": self.scheduler.state_dict(), "steps": self.length.steps,
                 "phase": self.segment.name}
        end_of = self.segment.kind != "run" and self.state.step == self.segment.end_step
        self.checkpointer.save(self.state.step, self.model, self.optimizer, state,
                               keep=f"the end of {self.segment.kind} {self.segment.name}" if end_of else None)

    # --- the loop -----------------------------------------------------------------------------------------------

    def train(self, checkpointer: checkpoint.Checkpointer) -> int:
        cfg, steps, self.checkpointer = self.cfg, self.length.steps, checkpointer
        if self.state.step >= steps:
            if self._final_evaluation_missing():
                self._say(f"training is complete ({self.state.step} of {steps} steps); its final evaluation is "
                          "missing: evaluating")
                self._log("eval", self.evaluate())
            else:
                self._say(f"training is complete ({self.state.step} of {steps} steps)")
            return ExitCode.OK
        if self.phased and self.metrics is not None:
            self._show_plan()
        if cfg.eval.at_start and self.valid and self.state.step == 0:
            self._log("eval", self.evaluate())
        batches = self._segment_batches()
        if self.resumed_from is not None:
            checkpoint.restore_rng(self.resumed_from)
        while self.state.step < steps:
            if self.state.step == self.segment.end_step:  # the next phase: its data, its validation sets
                self.segment = self.plan.segment_at(self.state.step)
                self.train_data, self.valid = self._build_datasets(self.segment)
                batches = self._segment_batches()
                self._say(f"{self.segment.kind} {self.segment.name} from step {self.state.step + 1}")
            profiler = profiling.start(cfg.logging, self.state.step + 1, self.d.rank, self.d.device)
            start = time.perf_counter()
            result = self.train_step(batches)
            elapsed = time.perf_counter() - start
            step, last = self.state.step, self.state.step == steps
            # the end of a phase: evaluated on its validation sets and kept as a checkpoint
            phase_end = self.phased and step == self.segment.end_step and not last
            if profiler is not None:
                self._finish_profile(profiler)
            if step % cfg.logging.interval == 0 or last:
                self._log("train", self._train_values(result, elapsed))
            if self.valid and (cfg.eval.interval and step % cfg.eval.interval == 0 or phase_end) and not last:
                self._log("eval", self.evaluate())
            if result.stop_requested or last and cfg.checkpoint.save_at_end or phase_end or \
                    cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0:
                self.save()
            if result.stop_requested and not last:  # at the last step the run is done: it finishes as below
                self.checkpointer.wait()
                self._say(f"{self.stop.name()}: saved step {step}; run again to continue")
                return ExitCode.STOPPED
        if self.valid:
            self._log("eval", self.evaluate())  # while the last checkpoint is written
        self.checkpointer.wait()
        return ExitCode.OK

    def _final_evaluation_missing(self) -> bool:
        """A finished run whose final evaluation is not in metrics.jsonl (killed after its last save): rank 0 reads,
        every rank learns."""
        missing = [False]
        if self.metrics is not None and self.valid:
            path = self.run.metrics
            records = (json.loads(line) for line in path.read_text().splitlines() if line.strip()) \
                if path.exists() else iter(())
            missing = [not any(r.get("kind") == "eval" and r.get("step") == self.state.step for r in records)]
        dist.broadcast_object_list(missing, src=0)
        return missing[0]

    def _train_values(self, result: StepResult, elapsed: float) -> dict:
        per_s = self.tokens_per_step / elapsed
        values = {"loss": result.loss, "lr": result.lr, "grad_norm": result.grad_norm,
                  "tokens_per_s": per_s, "tokens_per_s_per_device": per_s / self.d.world, "step_s": elapsed,
                  "data_share": result.data_s / elapsed, "tokens": self.state.consumed_tokens}
        if result.router_aux_loss is not None:
            values["router_aux_loss"] = result.router_aux_loss
        if self.cuda:
            values["memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
            values["memory_retries"] = torch.cuda.memory_stats().get("num_alloc_retries", 0)
            self._warn_memory_retries(values["memory_retries"])
        if self.peak_flops:
            values["mfu"] = self.flops_per_token * per_s / self.d.world / self.peak_flops
        return values

    def _warn_memory_retries(self, retries: int) -> None:
        """Each retry frees the allocator's cache and synchronises: a run at the card's limit slows down."""
        if retries and not self.warned_memory_retries:
            self.warned_memory_retries = True
            self._say(f"step {self.state.step}: the CUDA allocator ran out of cached memory and had to free and "
                      "retry (memory_retries in the metrics); steps slow down at the card's limit: recompute more "
                      "(model.full_recompute_layers, model.activation_checkpointing) or use optim.state_dtype: bf16")

    def _finish_profile(self, profiler) -> None:
        table = profiling.finish(profiler, self.run.path, self.d.rank, self.state.step, self.d.device)
        if self.d.rank == min(self.cfg.logging.profile_ranks):
            print(f"keizoku: step {self.state.step} profiled: {table.parent}/", flush=True)

    def _log(self, kind: str, values: dict) -> None:
        if self.metrics is not None:
            # a step's record names the phase the step trained in (step 0: the first)
            phase = {"phase": self.plan.segment_at(max(self.state.step - 1, 0)).name} if self.phased else {}
            self.metrics.log(kind, self.state.step, {**values, **phase})

    def _show_plan(self) -> None:
        """The run's segments and their rates, printed, and RUN_DIR/schedule.json and schedule.png written."""
        per_step = self.tokens_per_step
        for seg in self.plan.segments:
            self._say(seg.describe(per_step))
        written = write_plan(self.plan, self.run.path, per_step)
        self._say(f"the schedule, plotted: {written}")

    def _say(self, message: str) -> None:
        if self.d.rank == 0:
            print(f"keizoku: {message}", flush=True)


def _metrics_logger(cfg: KeizokuConfig, run: RunDir) -> MetricsLogger:
    wandb = None
    if cfg.logging.wandb:
        try:
            import wandb as wandb_module
        except ImportError:
            raise TrainingError("logging.wandb: true, but wandb is not installed (pip install wandb)") from None
        from omegaconf import OmegaConf

        wandb = wandb_module.init(project=cfg.logging.wandb_project, dir=str(run.path), resume="allow",
                                  config=OmegaConf.to_container(OmegaConf.structured(cfg)))
    return MetricsLogger(run.path, tensorboard_dir=run.tensorboard if cfg.logging.tensorboard else None, wandb=wandb)
