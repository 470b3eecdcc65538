"""AdamW with bf16 moments (optim.state_dtype: bf16) against torch.optim.AdamW, and its stochastic rounding."""

from __future__ import annotations

import torch

from keizoku.engines.torch.optim import AdamWLowPrecisionState, _round


def _train(optimizer_class, steps: int = 10, **kw) -> tuple[list[torch.nn.Parameter], torch.optim.Optimizer]:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(64, 32)), torch.nn.Parameter(torch.randn(32))]
    opt = optimizer_class([{"params": params[:1], "weight_decay": 0.1}, {"params": params[1:], "weight_decay": 0.0}],
                          lr=1e-2, betas=(0.9, 0.95), eps=1e-8, **kw)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return params, opt


def test_update_is_torch_adamw():
    """With fp32 moments the update is torch.optim.AdamW's (decoupled decay, bias correction), to rounding."""
    reference, _ = _train(torch.optim.AdamW)
    ours, opt = _train(AdamWLowPrecisionState, state_dtype=torch.float32)
    for a, b in zip(reference, ours):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    assert set(opt.state[ours[0]]) == {"step", "exp_avg", "exp_avg_sq"}  # AdamW's state keys: checkpoints interchange


def test_bf16_moments_stay_close_to_fp32():
    reference, _ = _train(torch.optim.AdamW)
    ours, opt = _train(AdamWLowPrecisionState)
    assert opt.state[ours[0]]["exp_avg"].dtype == opt.state[ours[0]]["exp_avg_sq"].dtype == torch.bfloat16
    assert ours[0].dtype == torch.float32  # master weights stay fp32
    start, _ = _train(torch.optim.AdamW, steps=0)
    moved = (reference[0] - start[0]).abs().max()
    for a, b in zip(reference, ours):
        assert (a - b).abs().max() < 0.01 * moved  # 10 steps of lr 1e-2 move weights ~0.1; bf16 moments ~1e-3 of it
        assert not torch.equal(a, b)


def test_stochastic_rounding_is_unbiased():
    x = torch.full((200_000,), 1 + 2 ** -10)  # a quarter of the way from bf16's 1 to its next value, 1 + 2^-7
    assert x.to(torch.bfloat16).float().mean() == 1  # round-to-nearest loses the increment every time
    rounded = _round(x, torch.bfloat16)
    assert rounded.dtype == torch.bfloat16 and set(rounded.float().unique().tolist()) == {1.0, 1 + 2 ** -7}
    assert abs(rounded.float().mean().item() - (1 + 2 ** -10)) < 2e-5


def test_second_moment_tracks_gradients_with_beta2_near_one():
    """β2 = 0.999 adds 0.1% a step, below bf16's resolution: the bf16 second moment must still converge."""
    p = torch.nn.Parameter(torch.zeros(10_000))
    opt = AdamWLowPrecisionState([p], lr=0.0, betas=(0.9, 0.999))
    for _ in range(2000):
        p.grad = torch.ones(10_000)
        opt.step()
    expected = 1 - 0.999 ** 2000  # the fp32 EMA of g² = 1 from 0: 0.8648
    assert abs(opt.state[p]["exp_avg_sq"].float().mean().item() - expected) < 2e-3


def test_fp8_all_gather_weights_are_updated_through_their_data():
    """FSDP2 with FP8 all-gather wraps each weight in torchao's WeightWithDynamicFloat8CastTensor: the update goes to
    the wrapped data (a plain tensor, as the compiled kernel needs) and equals the update of an unwrapped weight."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    from keizoku.engines.torch.optim import _local

    torch.manual_seed(0)
    plain = torch.nn.Linear(32, 32, bias=False)
    wrapped = torch.nn.Sequential(torch.nn.Linear(32, 32, bias=False))
    wrapped[0].weight.data.copy_(plain.weight.data)
    convert_to_float8_training(wrapped, config=Float8LinearConfig(enable_fsdp_float8_all_gather=True))
    weight = wrapped[0].weight
    assert type(weight).__name__ == "WeightWithDynamicFloat8CastTensor" and type(_local(weight)) is torch.Tensor
    for model in (plain, wrapped):
        opt = AdamWLowPrecisionState(model.parameters(), lr=1e-2, state_dtype=torch.float32)
        for i in range(3):
            for p in model.parameters():
                p.grad = torch.full_like(p, 0.1 * (i + 1))
            opt.step()
    torch.testing.assert_close(_local(weight), plain.weight.data, rtol=0, atol=1e-6)


def test_compiled_update_runs_parameters_of_one_layout_together():
    """compile: one compiled call per GROUP parameters of the same shape (the CPU launches ~40 calls a step for
    Llama-3.1-8B, not 291), still torch.optim.AdamW's update; the graphs are few (shapes are symbolic)."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    shapes = [(16, 8)] * 5 + [(8, 16)] * 2 + [(8,)] * 3  # decay: 5 + 2 matrices; no decay: 3 vectors
    start = [torch.randn(s) for s in shapes]

    def train(optimizer_class, **kw):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        opt = optimizer_class([{"params": params[:7], "weight_decay": 0.1}, {"params": params[7:], "weight_decay": 0.0}],
                              lr=1e-2, betas=(0.9, 0.95), eps=1e-8, **kw)
        calls = []
        if optimizer_class is AdamWLowPrecisionState:
            opt.GROUP = 2
            compiled = opt._update_group
            opt._update_group = lambda *tensors: (calls.append(len(tensors[0])), compiled(*tensors))[1]
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        return params, calls

    reference, _ = train(torch.optim.AdamW)
    graphs = counters["stats"]["unique_graphs"]
    ours, calls = train(AdamWLowPrecisionState, state_dtype=torch.float32, compile=True)
    for a, b in zip(reference, ours):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    assert calls == [2, 2, 1, 2, 2, 1] * 3  # per step: (16, 8) ×5, (8, 16) ×2, (8,) ×3, in groups of at most 2
    assert counters["stats"]["unique_graphs"] - graphs <= 4  # lengths 2 and 1 × ranks 2 and 1, not one per shape
