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

import functools

import torch

from keizoku.engines.torch import TrainingError

RECIPES = ("tensorwise", "rowwise")


class Float8Unavailable(TrainingError):
    pass


def _torchao():
    try:
        import torchao.float8 as f8
    except ImportError:
        raise Float8Unavailable("model.fp8: needs torchao (pip install 'keizoku[fp8]' or pip install torchao)") from None
    return f8


def fuse_weight_casts() -> None:
    """With FP8 all-gather, FSDP asks each weight shard for its FP8 bits every time it gathers the layer: twice per
    micro batch (forward, backward), 8 times a step for Llama-3.1-8B at 4 micro batches. torchao casts in three
    eager kernels (scale, clamp, convert), reading and writing fp32 twice: 0.39 s of a 2.75 s step on 2× H200
    (bench/gpu/README.md, profile). One compiled kernel makes the same bits reading the fp32 shard once.

    It replaces torchao's ``WeightWithDynamicFloat8CastTensor.fsdp_pre_all_gather`` in this process, only for the
    case keizoku uses (a scale precomputed after the optimizer step); anything else goes to torchao's own."""
    from torchao.float8 import fsdp_utils

    cls = fsdp_utils.WeightWithDynamicFloat8CastTensor
    torchao_pre_all_gather = cls.fsdp_pre_all_gather
    if getattr(torchao_pre_all_gather, "keizoku_fused", False):
        return

    def fsdp_pre_all_gather(self, mesh):
        scale = getattr(self, "_precomputed_scale", None)
        if scale is None:
            return torchao_pre_all_gather(self, mesh)
        return (_compiled_cast()(self._tensor, scale, self._dtype),), (scale,)

    fsdp_pre_all_gather.keizoku_fused = True
    cls.fsdp_pre_all_gather = fsdp_pre_all_gather


def cast_to_float8(hp: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """torchao's saturated cast (``hp_tensor_and_scale_to_float8``'s bits): scale in fp32, clamp to the FP8
    range, round to FP8."""
    limit = torch.finfo(dtype).max
    return (hp.to(torch.float32) * scale).clamp(-limit, limit).to(dtype)


@functools.cache
def _compiled_cast():
    return torch.compile(cast_to_float8, dynamic=True)


def convert(layers: torch.nn.ModuleList, recipe: str, fsdp_fp8_all_gather: bool,
            which: str = "auto") -> tuple[int, int]:
    """Swap the linear layers inside ``layers`` for Float8Linear in place; returns (swapped, linear layers).

    A linear layer whose sizes are not multiples of 16 (what the FP8 kernels need) stays in bf16, and with
    ``which="auto"`` so does one below torchao's size thresholds for the recipe, where the casts cost about as much
    as the FP8 matmul saves (torchao's own filter, from its H100 measurements)."""
    if recipe not in RECIPES:
        raise ValueError(f"model.fp8: {recipe!r} is none of none, {', '.join(RECIPES)}")
    if which not in ("auto", "all"):
        raise ValueError(f"model.fp8_layers: {which!r} is neither auto nor all")
    f8 = _torchao()
    config = f8.Float8LinearConfig.from_recipe_name(recipe)
    if recipe == "tensorwise" and fsdp_fp8_all_gather:
        config = f8.Float8LinearConfig(enable_fsdp_float8_all_gather=True)
        fuse_weight_casts()
    large_enough = _size_filter(recipe) if which == "auto" else (lambda module, fqn: True)
    swapped = linear = 0

    def eligible(module: torch.nn.Module, fqn: str) -> bool:
        nonlocal swapped, linear
        if not isinstance(module, torch.nn.Linear):
            return False
        linear += 1
        ok = module.in_features % 16 == 0 and module.out_features % 16 == 0 and large_enough(module, fqn)
        swapped += ok
        return ok

    for layer in layers:
        f8.convert_to_float8_training(layer, config=config, module_filter_fn=eligible)
    return swapped, linear


def _size_filter(recipe: str):
    try:
        from torchao.float8.float8_linear_utils import _auto_filter_for_recipe
    except ImportError:
        raise Float8Unavailable("model.fp8_layers: auto needs torchao's size filter (torchao >= 0.13); "
                                "upgrade torchao or set model.fp8_layers: all") from None
    return _auto_filter_for_recipe(recipe, filter_fqns=[])


def after_optimizer_step(model: torch.nn.Module, recipe: str, fsdp_fp8_all_gather: bool) -> None:
    """With FP8 all-gather, compute every weight's scale in one pass after the step (instead of one small
    reduction per layer in the next forward)."""
    if recipe == "tensorwise" and fsdp_fp8_all_gather:
        from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

        precompute_float8_dynamic_scale_for_fsdp(model)
