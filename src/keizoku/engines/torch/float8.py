"""FP8 matmuls for the decoder layers' linear layers (``model.fp8``), through torchao's float8 training.

Each ``nn.Linear`` inside the decoder layers becomes a ``torchao`` ``Float8Linear``: its weight stays an fp32
master parameter (same name and shape, so checkpoints and HF exports are unchanged); in forward and backward the
input, weight and output gradient are cast to FP8 (e4m3 / e5m2) with dynamic scales and multiplied by
``torch._scaled_mm``. The output layer and embeddings stay in bf16 (the loss is sensitive to them, and they are a
small share of the FLOPs). Recipes: ``tensorwise`` (one scale per tensor; with FSDP2 the all-gather of
parameters is in FP8 too, halving its traffic) and ``rowwise`` (a scale per row: more accurate, a little slower).
Needs Hopper (sm90) or newer GPUs in practice, and ``torch.compile`` to be fast (it fuses the scaling and casts);
it runs unfused on a CPU, which is how the tests exercise it.
"""

from __future__ import annotations

import torch

RECIPES = ("tensorwise", "rowwise")


class Float8Unavailable(RuntimeError):
    pass


def _torchao():
    try:
        import torchao.float8 as f8
    except ImportError:
        raise Float8Unavailable("model.fp8: needs torchao (pip install 'keizoku[fp8]' or pip install torchao)") from None
    return f8


def convert(layers: torch.nn.ModuleList, recipe: str, fsdp_fp8_all_gather: bool) -> int:
    """Swap the linear layers inside ``layers`` for Float8Linear in place; returns how many were swapped.

    A linear layer whose dimensions are not multiples of 16 (what the FP8 kernels need) is left in bf16."""
    if recipe not in RECIPES:
        raise ValueError(f"model.fp8: {recipe!r} is none of none, {', '.join(RECIPES)}")
    f8 = _torchao()
    config = f8.Float8LinearConfig.from_recipe_name(recipe)
    if recipe == "tensorwise" and fsdp_fp8_all_gather:
        config = f8.Float8LinearConfig(enable_fsdp_float8_all_gather=True)
    swapped = 0

    def eligible(module: torch.nn.Module, fqn: str) -> bool:
        nonlocal swapped
        ok = isinstance(module, torch.nn.Linear) and module.in_features % 16 == 0 and module.out_features % 16 == 0
        swapped += ok
        return ok

    for layer in layers:
        f8.convert_to_float8_training(layer, config=config, module_filter_fn=eligible)
    return swapped


def after_optimizer_step(model: torch.nn.Module, recipe: str, fsdp_fp8_all_gather: bool) -> None:
    """With FP8 all-gather, compute every weight's scale in one pass after the step (instead of one small
    reduction per layer in the next forward)."""
    if recipe == "tensorwise" and fsdp_fp8_all_gather:
        from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

        precompute_float8_dynamic_scale_for_fsdp(model)
