"""model.activation_checkpointing: what each mode keeps and recomputes, counted on a real Llama decoder layer."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from keizoku.engines.torch import recompute

aten = torch.ops.aten


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count[func] += 1
        return func(*args, **(kwargs or {}))


def _ops(mode: str, fp8: bool = False) -> tuple[Counter, Counter]:
    """Operators run in the forward and in the backward pass of one decoder layer (``fp8``: its linear layers as
    torchao's Float8Linear, tensorwise)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                      attn_implementation="sdpa")
    torch.manual_seed(0)
    layer = LlamaDecoderLayer(cfg, layer_idx=0)
    if fp8:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training

        convert_to_float8_training(layer, config=Float8LinearConfig.from_recipe_name("tensorwise"))
    layer = recompute.wrap(layer, mode)
    x = torch.randn(2, 16, 64, requires_grad=True)
    pos = LlamaRotaryEmbedding(cfg)(x, torch.arange(16).unsqueeze(0))
    with _Ops() as forward:
        out = layer(x, position_embeddings=pos, attention_mask=None)
    out = out[0] if isinstance(out, tuple) else out
    with _Ops() as backward:
        out.square().sum().backward()
    return forward.count, backward.count


def test_modes_recompute_what_they_say():
    (forward, none), (_, selective), (_, full) = (_ops(m) for m in ("none", "selective", "full"))
    mm = aten.mm.default
    attention = [op for op in recompute.KEPT_OPS if "attention" in str(op)]
    # none: the backward pass runs no forward op again; its matmuls are the gradients' (2 per forward matmul)
    assert none[aten.silu.default] == 0 and sum(none[op] for op in attention) == 0
    # selective: the same matmuls and no attention forward as `none`, but the elementwise work again
    assert selective[mm] == none[mm] and sum(selective[op] for op in attention) == 0
    assert selective[aten.silu.default] == 1 and selective[aten.rsqrt.default] >= 2
    # full: the forward again, its matmuls and attention included (but the last matmul: recomputation stops early
    # once every tensor the backward needs exists again)
    assert forward[mm] == 7 and full[mm] == none[mm] + forward[mm] - 1 and sum(full[op] for op in attention) == 1 and full[aten.silu.default] == 1


def test_selective_keeps_the_fp8_scales_amax():
    """Under model.fp8 each cast's scale comes from the amax of its whole input: selective keeps those numbers
    (one each), so its backward runs no more amax reductions than `none`'s, while still recomputing the norms."""
    pytest.importorskip("torchao")
    (forward, none), (_, selective) = (_ops(m, fp8=True) for m in ("none", "selective"))
    amax = aten.max.default
    assert forward[amax] == 14  # eager: an input and a weight scale for each of the 7 linear layers
    assert selective[amax] == none[amax] and selective[aten.rsqrt.default] > none[aten.rsqrt.default]


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="none, selective, full"):
        recompute.wrap(torch.nn.Linear(2, 2), "some")


def test_full_recompute_layers_dial_between_modes():
    assert recompute.layer_modes(4, "selective", 1) == ["full", "selective", "selective", "selective"]
    assert recompute.layer_modes(3, "none", 3) == ["full"] * 3 and recompute.layer_modes(2, "none") == ["none"] * 2
    with pytest.raises(ValueError, match="model.full_recompute_layers: 5 is more than the model's 4 layers"):
        recompute.layer_modes(4, "selective", 5)
