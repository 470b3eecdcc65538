"""keizoku's fused FP8 weight cast for FSDP's FP8 all-gather gives torchao's bits (engines/torch/float8.py)."""

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
