"""Activation checkpointing of decoder layers (``model.activation_checkpointing``).

- ``none``: every activation is kept for the backward pass (fastest; the most memory).
- ``selective``: per-operator (torch.utils.checkpoint's selective checkpointing): the outputs of matmuls and
  attention are kept (and, with ``model.fp8``, each FP8 cast's amax: one number), everything else in the layer
  (norms, RoPE, SiLU·mul, residual adds, casts) is recomputed in the backward pass. The recomputed work is
  memory-bound and cheap; the kept tensors are the ones that cost FLOPs.
- ``full``: only each layer's input is kept; the whole layer runs again in the backward pass (~1/3 more compute,
  the least memory).
``model.full_recompute_layers: N`` makes the first N layers ``full`` and leaves the others in the chosen mode: the
dial for fitting a card's memory (Llama-3.1-8B, seq 8192, micro batch 1: selective keeps ~0.66 GB per layer, full
64 MB, and full costs one more forward of the layer).
"""

from __future__ import annotations

from functools import partial

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

MODES = ("none", "selective", "full")

_aten = torch.ops.aten
# operators whose outputs `selective` keeps: the FLOP-heavy ones (fp8 matmuls included), and full reductions to one
# value: under model.fp8 those are the amax of each FP8 cast's input (one number each), which the backward would
# otherwise recompute by reading the whole input again
KEPT_OPS = {
    _aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten._scaled_mm.default, _aten.max.default,
    *(getattr(_aten, name).default for name in (
        "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention_for_cpu",
        "_flash_attention_forward", "_efficient_attention_forward") if hasattr(_aten, name)),
}


def _keep_flop_heavy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in KEPT_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def layer_modes(n_layers: int, mode: str, full_layers: int = 0) -> list[str]:
    """The mode of each decoder layer: ``full`` for the first ``full_layers``, ``mode`` for the rest."""
    if full_layers > n_layers:
        raise ValueError(f"model.full_recompute_layers: {full_layers} is more than the model's {n_layers} layers")
    return ["full"] * full_layers + [mode] * (n_layers - full_layers)


def wrap(layer: torch.nn.Module, mode: str) -> torch.nn.Module:
    """``layer`` with the given activation checkpointing (``layer`` itself for ``none``)."""
    if mode == "none":
        return layer
    if mode == "full":
        return checkpoint_wrapper(layer, preserve_rng_state=False)
    if mode == "selective":
        return checkpoint_wrapper(layer, preserve_rng_state=False,
                                  context_fn=partial(create_selective_checkpoint_contexts, _keep_flop_heavy))
    raise ValueError(f"activation checkpointing: {mode!r} is none of {', '.join(MODES)}")
