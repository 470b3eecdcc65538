"""FP8 training pieces of engines/torch/float8.py: the fused weight cast for FSDP's FP8 all-gather gives torchao's bits;
model.fp8_layers chooses which linear layers compute in FP8."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("torchao")


def test_fused_weight_cast_gives_torchaos_bits(monkeypatch):
    from torchao.float8 import fsdp_utils
    from torchao.float8.float8_linear import LinearMMConfig
    from torchao.float8.float8_training_tensor import GemmInputRole, hp_tensor_and_scale_to_float8

    from keizoku.engines.torch import float8

    cls = fsdp_utils.WeightWithDynamicFloat8CastTensor
    monkeypatch.setattr(cls, "fsdp_pre_all_gather", cls.fsdp_pre_all_gather)  # undone after the test
    float8.fuse_weight_casts()
    float8.fuse_weight_casts()  # a second call leaves the first in place
    assert cls.fsdp_pre_all_gather.keizoku_fused

    torch.manual_seed(0)
    shard = torch.randn(96, 64) * torch.logspace(-6, 2, 64)  # values that round, underflow and (scaled) saturate
    config = LinearMMConfig()
    for scale in (torch.tensor(448.0 / shard.abs().max()), torch.tensor(1e4)):  # in range; many saturate
        weight = cls(shard, config, torch.float8_e4m3fn, precomputed_scale=scale)
        (bits,), (meta_scale,) = weight.fsdp_pre_all_gather(mesh=None)
        expected = hp_tensor_and_scale_to_float8(shard, scale, torch.float8_e4m3fn, config, GemmInputRole.WEIGHT)
        assert bits.dtype == torch.float8_e4m3fn and meta_scale is scale
        assert torch.equal(bits.view(torch.uint8), expected._data.view(torch.uint8))
    assert torch.equal(float8.cast_to_float8(shard, scale, torch.float8_e4m3fn).view(torch.uint8),
                       bits.view(torch.uint8))  # the compiled kernel (inductor on this CPU) and the eager function



@pytest.mark.parametrize("recipe, which, expected", [
    ("tensorwise", "auto", {"q_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
    ("rowwise", "auto", {"q_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
    ("tensorwise", "all", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
])
def test_fp8_layers_auto_keeps_layers_too_small_to_gain_in_bf16(recipe, which, expected):
    """Llama-3.1-8B's layer shapes (on the meta device: no memory): auto leaves k_proj and v_proj (4096 -> 1024) in
    bf16, as torchao's thresholds say; all converts every one; a size not a multiple of 16 stays bf16 either way."""
    from torchao.float8.float8_linear import Float8Linear

    from keizoku.engines.torch import float8

    shapes = {"q_proj": (4096, 4096), "k_proj": (4096, 1024), "v_proj": (4096, 1024), "o_proj": (4096, 4096),
              "gate_proj": (4096, 14336), "up_proj": (4096, 14336), "down_proj": (14336, 4096), "odd": (4096, 4104)}
    with torch.device("meta"):
        layers = torch.nn.ModuleList(
            [torch.nn.ModuleDict({n: torch.nn.Linear(*s, bias=False) for n, s in shapes.items()}) for _ in range(2)])
    assert float8.convert(layers, recipe, fsdp_fp8_all_gather=False, which=which) == (2 * len(expected), 16)
    for layer in layers:
        assert {n for n, m in layer.items() if isinstance(m, Float8Linear)} == expected
    with pytest.raises(ValueError, match="model.fp8_layers: 'some' is neither auto nor all"):
        float8.convert(layers, recipe, fsdp_fp8_all_gather=False, which="some")
