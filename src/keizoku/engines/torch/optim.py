"""AdamW with the usual weight-decay groups; optionally with its two moments stored in bf16.

``optim.state_dtype: bf16`` halves AdamW's state (8 → 4 bytes per parameter; Llama-3.1-8B on 2 GPUs: 16 GB less per GPU),
which is what lets selective recompute fit an 80 GB card (bench/gpu/README.md). The parameters stay fp32 master weights
and the update is computed in fp32 exactly as ``torch.optim.AdamW`` computes it; only the stored moments are rounded,
stochastically: with round-to-nearest, an increment below bf16's resolution (2^-8 relative; β2 = 0.999 adds 0.1% a step)
would be lost every step and the second moment would stop tracking the gradients. Megatron's counterpart is its
precision-aware optimizer (``exp_avg_dtype``/``exp_avg_sq_dtype``: bf16), which the megatron engine maps this setting to.
"""

from __future__ import annotations

import math

import torch
from torch.distributed.tensor import DTensor

from keizoku.config import OptimConfig


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (linear layers and embeddings); never biases or normalisation weights (1-D tensors)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw(model: torch.nn.Module, cfg: OptimConfig, device_type: str) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    if cfg.state_dtype == "bf16":
        return AdamWLowPrecisionState(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                      state_dtype=torch.bfloat16, compile=device_type == "cuda")
    fused = cfg.fused if cfg.fused is not None else device_type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused or None)


class AdamWLowPrecisionState(torch.optim.AdamW):
    """``torch.optim.AdamW`` (its hyperparameters, state layout and update: decoupled weight decay, bias correction)
    with ``exp_avg`` and ``exp_avg_sq`` kept in ``state_dtype``. Its state dict is AdamW's, so DCP checkpoints load
    either way: a run may switch between fp32 and bf16 moments on resume. ``compile`` (CUDA): one fused kernel per
    parameter, launched ``GROUP`` parameters of one shape at a time from one compiled graph; eager elsewhere. AdamW's
    amsgrad/maximize/foreach/fused/capturable variants are not offered."""

    # parameters per compiled call: one call per parameter cost ~0.24 ms of CPU (guards, launch), ~70 ms a step for
    # Llama-3.1-8B's 291 shards, on the critical path after the step's one host sync while the GPU waited
    # (bench/gpu/README.md, seventh session). A call per 8 same-shape parameters: ~40 calls; few graphs to compile
    # (one per tensor rank and chunk length, the shapes symbolic).
    GROUP = 8

    def __init__(self, params, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, state_dtype: torch.dtype = torch.bfloat16, compile: bool = False):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=False)
        self.state_dtype = state_dtype
        # Optimizer.load_state_dict casts every state tensor to its parameter's dtype (fp32): back to state_dtype
        self.register_load_state_dict_post_hook(AdamWLowPrecisionState._cast_moments)
        # dynamic shapes: one compiled graph per tensor rank (and group length) serves every parameter (no
        # flattening: a view of a non-contiguous shard would fail, and a copy would lose the in-place update)
        self._update_group = torch.compile(_adamw_update_group, dynamic=True, fullgraph=True) if compile else None

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = float(group["lr"]), group["betas"], group["eps"], group["weight_decay"]
            coefficients: dict[tuple, torch.Tensor] = {}  # per (step, device): one small host→device copy
            same_layout: dict[tuple, list[tuple]] = {}  # compiled: ((step, device), layout) → parameters' tensors
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, dtype=self.state_dtype)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=self.state_dtype)
                state["step"] += 1
                step, param = int(state["step"].item()), _local(p)
                key = (step, param.device)
                if key not in coefficients:
                    c1, c2 = 1 - beta1 ** step, 1 - beta2 ** step
                    coefficients[key] = torch.tensor(
                        [1 - lr * wd, 1 - beta1, beta2, 1 - beta2, 1 / math.sqrt(c2), eps, lr / c1],
                        dtype=torch.float32).to(param.device, non_blocking=True)
                tensors = (param, _local(p.grad), _local(state["exp_avg"]), _local(state["exp_avg_sq"]))
                plain = all(type(t) is torch.Tensor for t in tensors)  # else eager: subclasses dispatch the ops
                if self._update_group is None or not plain:
                    _adamw_update(*tensors, coefficients[key])
                elif param.numel():  # (an empty shard: nothing to update, and a size-0 graph to spare)
                    layout = tuple((t.shape, t.stride(), t.dtype) for t in tensors)
                    same_layout.setdefault((key, layout), []).append(tensors)
            for (key, _), members in same_layout.items():
                for i in range(0, len(members), self.GROUP):
                    self._update_group(*map(list, zip(*members[i:i + self.GROUP])), coefficients[key])
        return loss

    @staticmethod
    def _cast_moments(optimizer: "AdamWLowPrecisionState") -> None:
        for state in optimizer.state.values():
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key] = state[key].to(optimizer.state_dtype)


def _local(t: torch.Tensor) -> torch.Tensor:
    """The plain tensor holding this rank's values: the local shard of a DTensor (FSDP2 parameters, gradients and
    states; updates are elementwise), and the data of a wrapper subclass such as torchao's FP8 all-gather weight
    (its one inner tensor of the outer shape; in-place updates of it are updates of the weight)."""
    t = (t.to_local() if isinstance(t, DTensor) else t).detach()  # detach: a Parameter → a plain tensor, same storage
    if type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__"):
        inner = [getattr(t, name) for name in t.__tensor_flatten__()[0]]
        same = [x for x in inner if x.shape == t.shape]
        if len(same) == 1:
            return _local(same[0])
    return t


def _adamw_update(param, grad, exp_avg, exp_avg_sq, k):
    """torch.optim.AdamW's step on one parameter, in fp32; k = [1 - lr·wd, 1 - β1, β2, 1 - β2, 1/√(1 - β2^t),
    eps, lr/(1 - β1^t)]."""
    g = grad.float()
    m = exp_avg.float().lerp(g, k[1])
    v = exp_avg_sq.float() * k[2] + g * g * k[3]
    param.mul_(k[0]).sub_(k[6] * m / (v.sqrt() * k[4] + k[5]))
    exp_avg.copy_(_round(m, exp_avg.dtype))
    exp_avg_sq.copy_(_round(v, exp_avg_sq.dtype))


def _adamw_update_group(params, grads, exp_avgs, exp_avg_sqs, k):
    """``_adamw_update`` on each parameter of a list (compiled: one graph, a kernel per parameter)."""
    for tensors in zip(params, grads, exp_avgs, exp_avg_sqs):
        _adamw_update(*tensors, k)


def _round(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 → bf16 with stochastic rounding (unbiased: E[round(x)] = x): add uniform noise below bf16's last bit to the
    fp32 bit pattern, then truncate. Other dtypes: a plain cast."""
    if dtype != torch.bfloat16:
        return x.to(dtype)
    bits = x.view(torch.int32) + torch.randint_like(x, 0, 1 << 16, dtype=torch.int32)
    return (bits & -65536).view(torch.float32).to(torch.bfloat16)
