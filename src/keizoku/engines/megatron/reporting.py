"""What keizoku adds to Megatron-Bridge's training loop: walltime signals, ``metrics.jsonl`` and evaluation.

- ``WalltimeRelay``: Bridge's exit handler watches one signal (SIGTERM); schedulers warn of the walltime with
  SIGUSR1/SIGUSR2 (Slurm ``--signal``, Grid Engine ``-notify``, PBS ``kill -USR1``). The relay calls the
  SIGTERM handler Bridge installed, so Bridge saves after the current step and stops. A warning that comes before
  Bridge has installed it (import, model build, checkpoint load: minutes for a large model) is kept and given to
  Bridge when training starts (Bridge then saves after the first step).
- ``Reporter`` (Bridge's callbacks, Bridge ≥ 0.3): ``RUN_DIR/metrics.jsonl`` with the torch engine's records
  (``{"kind": "train", "step", "loss", "lr", "grad_norm", "tokens_per_s", ...}``, ``{"kind": "eval", "step",
  "<name>_loss", "<name>_ppl"}``), and evaluation of every ``data.validation`` set the way the torch engine
  evaluates: before step 1 (``eval.at_start``), every ``eval.interval`` steps and at the end, each time on the
  same first ``eval.batches`` micro batches per data-parallel rank of each set. Bridge's own validation is off
  then (Megatron evaluates one set and moves on through it, so its numbers are not comparable between steps).
  Written by the last rank, which holds the loss under pipeline parallelism; eval losses also go to Bridge's
  TensorBoard/W&B writers as ``eval/<name>_loss``.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

from keizoku.config import KeizokuConfig
from keizoku.metrics import MetricsLogger, eval_values

WALLTIME_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)


class WalltimeRelay:
    """SIGUSR1/SIGUSR2 → the SIGTERM handler of Bridge's ``DistributedSignalHandler``.

    ``deferrable``: the release has callbacks, so a signal that comes before Bridge's handler exists is kept for
    ``on_train_start``; without them (Bridge 0.2) it becomes a SIGTERM at once (nothing is trained yet, nothing
    is lost)."""

    def __init__(self, deferrable: bool, signals: tuple[int, ...] = WALLTIME_SIGNALS, log=print):
        self.deferrable, self.pending, self.log = deferrable, None, log
        for sig in signals:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self._give_to_bridge(frame):
            self.log(f"keizoku: {name}: Megatron-Bridge saves a checkpoint after this step and stops")
        elif self.deferrable:
            self.pending = signum
            self.log(f"keizoku: {name} before training started: Megatron-Bridge will save after the first step "
                     "and stop")
        else:
            os.kill(os.getpid(), signal.SIGTERM)

    def _give_to_bridge(self, frame) -> bool:
        """Call the Python-level SIGTERM handler (Bridge's) directly: no second signal to be masked or lost."""
        handler = signal.getsignal(signal.SIGTERM)
        if not callable(handler):  # SIG_DFL, SIG_IGN or None: Bridge has not installed its handler yet
            return False
        handler(signal.SIGTERM, frame)
        return True

    def on_train_start(self, context=None) -> None:
        if self.pending is not None and self._give_to_bridge(None):
            self.pending = None


# --- evaluation data: the torch engine's validation samples -------------------------------------------------

def validation_datasets(cfg: KeizokuConfig, eval_samples: int) -> dict[str, Any]:
    """{name: GPTDataset} of ``data.validation``, built as ``keizoku.data.blend.build`` builds them for the torch
    engine (same config, same cache), so both engines evaluate the same samples."""
    from keizoku.data import blend

    return blend.build_validation(cfg.data, seq_length=cfg.data.seq_length, eval_samples=eval_samples,
                                  tokenizer=blend.run_tokenizer(cfg), cache_dir=blend.sample_cache_dir(cfg))


def validation_batches(dataset, eval_samples: int, micro_batch: int, dp_rank: int, dp_size: int):
    """This data-parallel rank's micro batches (dicts of tokens, labels, loss_mask, position_ids: what Bridge's
    ``get_batch`` reads), sampled like the torch engine's evaluation."""
    import torch

    from keizoku.data.blend import SampleSampler

    return torch.utils.data.DataLoader(dataset, batch_sampler=SampleSampler(eval_samples, 0, micro_batch, dp_rank,
                                                                             dp_size), num_workers=0)


# --- the callbacks ---------------------------------------------------------------------------------------------

def train_record(*, loss: float | None, lr: float, grad_norm: float | None, step_s: float, tokens_per_step: int,
                 world: int, step: int, memory_gib: float | None) -> dict[str, Any]:
    """The torch engine's train record (its keys, same meaning)."""
    values: dict[str, Any] = {"loss": loss, "lr": lr, "grad_norm": grad_norm,
                              "tokens_per_s": tokens_per_step / step_s,
                              "tokens_per_s_per_device": tokens_per_step / step_s / world,
                              "step_s": step_s, "tokens": step * tokens_per_step}
    if memory_gib is not None:
        values["memory_gib"] = memory_gib
    return values


class Reporter:
    """Bridge callbacks (registered by event name, so no Bridge class is subclassed)."""

    EVENTS = ("on_train_start", "on_train_step_start", "on_train_step_end", "on_train_end")

    def __init__(self, cfg: KeizokuConfig, steps: int, relay: WalltimeRelay, phase: str | None = None):
        # phase: the phase or extension this Bridge run trains (its records name it); steps: where it ends
        self.cfg, self.steps, self.relay = cfg, steps, relay
        self.phase = {"phase": phase} if phase else {}
        self.tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_length
        self.metrics: MetricsLogger | None = None
        self.valid: dict[str, Any] = {}
        self.t0, self.lr = 0.0, None

    def register(self, manager) -> None:
        for event in self.EVENTS:
            manager.register(event, getattr(self, event))

    # Bridge's events -------------------------------------------------------------------------------------------
    def on_train_start(self, ctx) -> None:
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        self.relay.on_train_start()
        if dist.get_rank() == dist.get_world_size() - 1:
            # the console gets Bridge's own training log; keizoku prints its evaluations (``evaluate``)
            self.metrics = MetricsLogger(Path(self.cfg.run_dir).absolute(), console=False)
            if ctx.state.train_state.step:  # resumed: the steps after the checkpoint are replayed, one record each
                self.metrics.resume_at(ctx.state.train_state.step)
        self.dp_rank, self.dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        self.eval_samples = self.cfg.eval.batches * self.cfg.train.micro_batch_size * self.dp_size
        if self.cfg.data.validation and not self.cfg.data.mock:
            if dist.get_rank() == 0:  # rank 0 writes the index caches, the others then read them
                self.valid = validation_datasets(self.cfg, self.eval_samples)
            dist.barrier()
            if dist.get_rank() != 0:
                self.valid = validation_datasets(self.cfg, self.eval_samples)
        if self.valid and self.cfg.eval.at_start and ctx.state.train_state.step == 0:
            self.evaluate(ctx, 0)

    def on_train_step_start(self, ctx) -> None:
        self.t0 = time.perf_counter()
        # the rate this step's update uses: by the step's end Megatron's scheduler has moved on to the next step's
        optimizer = getattr(ctx, "optimizer", None)
        self.lr = float(optimizer.param_groups[0]["lr"]) if optimizer is not None else None

    def on_train_step_end(self, ctx) -> None:
        import torch

        step = ctx.state.train_state.step + 1  # Bridge counts the step after this event
        if self.metrics is not None and (step % self.cfg.logging.interval == 0 or step == self.steps):
            loss = (ctx.loss_dict or {}).get("lm loss")
            self.metrics.log("train", step, train_record(
                loss=None if loss is None else float(loss),
                lr=self.lr if self.lr is not None else float(ctx.optimizer.param_groups[0]["lr"]),
                grad_norm=None if ctx.grad_norm is None else float(ctx.grad_norm),
                step_s=time.perf_counter() - self.t0, tokens_per_step=self.tokens_per_step,
                world=torch.distributed.get_world_size(), step=step,
                memory_gib=torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None)
                | self.phase)
        if self.valid and self.cfg.eval.interval and step % self.cfg.eval.interval == 0 and step < self.steps:
            self.evaluate(ctx, step)

    def on_train_end(self, ctx) -> None:
        if self.valid:
            self.evaluate(ctx, ctx.state.train_state.step)
        if self.metrics is not None:
            self.metrics.close()

    # evaluation ------------------------------------------------------------------------------------------------
    def evaluate(self, ctx, step: int) -> None:
        """Every validation set through Megatron-Core's forward-only schedule with Bridge's GPT forward step."""
        import torch
        from megatron.bridge.training.gpt_step import forward_step
        from megatron.bridge.training.utils.train_utils import prepare_forward_step_func
        from megatron.core import parallel_state as ps
        from megatron.core.pipeline_parallel import get_forward_backward_func

        model = ctx.model
        # an overlapped parameter all-gather (distributed optimizer) runs in forward pre-hooks: finish it first
        hooked = [m for m in model if getattr(m, "remove_forward_pre_hook_handles", None)]
        for m in hooked:
            m.disable_forward_pre_hook(param_sync=True)
        for m in model:
            m.eval()
        last_stage = ps.is_pipeline_last_stage(ignore_virtual=True)
        step_fn = prepare_forward_step_func(forward_step, ctx.state)
        losses = {}
        with torch.no_grad():
            for name, dataset in self.valid.items():
                batches = iter(validation_batches(dataset, self.eval_samples, self.cfg.train.micro_batch_size,
                                                  self.dp_rank, self.dp_size))
                iterator = _per_chunk(model, batches)
                out = get_forward_backward_func()(
                    forward_step_func=step_fn, data_iterator=iterator, model=model,
                    num_microbatches=self.cfg.eval.batches, seq_length=self.cfg.data.seq_length,
                    micro_batch_size=self.cfg.train.micro_batch_size, forward_only=True)
                if last_stage:  # [sum of token losses, tokens] per micro batch
                    total = torch.stack([d["lm loss"].view(-1).float() for d in out]).sum(0)
                    torch.distributed.all_reduce(total, group=ps.get_data_parallel_group(with_context_parallel=True))
                    losses[name] = (total[0] / total[1]).item()
        for m in model:
            m.train()
        for m in hooked:
            m.enable_forward_pre_hook()
        if self.metrics is not None:
            values = eval_values(losses)
            self.metrics.log("eval", step, values | self.phase)
            print(f"[eval step {step}] " + "  ".join(f"{k} {v:.4f}" for k, v in values.items()), flush=True)
            writer = ctx.state.tensorboard_logger
            if writer is not None:
                for k, v in values.items():
                    writer.add_scalar(f"eval/{k}", v, step)
            wandb = ctx.state.wandb_logger
            if wandb is not None:
                wandb.log({f"eval/{k}": v for k, v in values.items()}, step)


def _per_chunk(model: list, batches):
    """Virtual pipeline stages each read the same micro batches (Bridge's helper); one chunk reads the iterator."""
    if len(model) == 1:
        return batches
    from megatron.bridge.data.iterator_utils import make_data_iterator_list

    return make_data_iterator_list(model=model, data_iterator=batches)
