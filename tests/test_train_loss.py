"""The chunked output layer + cross-entropy (keizoku.engines.torch.loss) against F.cross_entropy on full logits."""

from __future__ import annotations

import pytest
import torch

from keizoku.engines.torch.loss import IGNORE_INDEX, CausalLMWithLoss, chunked_lm_loss, chunking_unsupported, full_lm_loss


def _inputs(dtype, seed, tokens=(3, 37), hidden=24, vocab=101):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*tokens, hidden, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) / hidden**0.5).to(dtype).requires_grad_()
    y = torch.randint(0, vocab, tokens, generator=g)
    y[0, :5] = IGNORE_INDEX
    return h, w, y


def _loss_and_grads(fn, h, w, y, scale=1.0):
    h.grad = w.grad = None
    loss = fn(h, w, y)
    (loss * scale).backward()
    return loss.detach(), h.grad.clone(), w.grad.clone()


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# chunks that divide the tokens, that leave a remainder, of one token, and of more than all tokens
@pytest.mark.parametrize("chunk", [37, 10, 1, 1000])
def test_chunked_loss_and_gradients_equal_cross_entropy_fp32(chunk):
    h, w, y = _inputs(torch.float32, seed=chunk)
    ref = _loss_and_grads(lambda h, w, y: full_lm_loss(h @ w.t(), y), h, w, y, scale=0.37)
    out = _loss_and_grads(lambda h, w, y: chunked_lm_loss(h, w, y, chunk), h, w, y, scale=0.37)
    assert out[0].item() == pytest.approx(ref[0].item(), rel=1e-6)
    assert _rel(out[1], ref[1]) < 1e-5 and _rel(out[2], ref[2]) < 1e-5
    assert out[1][0, :5].abs().max() == 0  # ignored labels give no gradient


def test_chunked_loss_bf16_matches_an_fp64_reference():
    h, w, y = _inputs(torch.bfloat16, seed=3, tokens=(2, 64), hidden=64, vocab=500)
    ref = _loss_and_grads(lambda h, w, y: full_lm_loss(h.double() @ w.double().t(), y), h, w, y)
    out = _loss_and_grads(lambda h, w, y: chunked_lm_loss(h, w, y, 16), h, w, y)
    assert out[0].dtype == torch.float32 and out[1].dtype == torch.bfloat16 and out[2].dtype == torch.bfloat16
    assert out[0].item() == pytest.approx(ref[0].item(), rel=1e-3)
    assert _rel(out[1], ref[1]) < 1e-2 and _rel(out[2], ref[2]) < 1e-2


def test_chunked_loss_without_gradients_keeps_none():
    h, w, y = _inputs(torch.float32, seed=5)
    with torch.no_grad():
        loss = chunked_lm_loss(h, w, y, 8)
    assert not loss.requires_grad
    assert loss.item() == pytest.approx(full_lm_loss(h.detach() @ w.detach().t(), y).item(), rel=1e-6)
    with pytest.raises(ValueError, match="chunk must be at least 1"):
        chunked_lm_loss(h, w, y, 0)


def test_compiled_chunk_matches_eager():
    h, w, y = _inputs(torch.float32, seed=7, tokens=(2, 16), hidden=16, vocab=64)
    ref = _loss_and_grads(lambda h, w, y: chunked_lm_loss(h, w, y, 8), h, w, y)
    out = _loss_and_grads(lambda h, w, y: chunked_lm_loss(h, w, y, 8, compile=True), h, w, y)
    assert out[0].item() == pytest.approx(ref[0].item(), rel=1e-5)
    assert _rel(out[1], ref[1]) < 1e-5 and _rel(out[2], ref[2]) < 1e-5


def _tiny_llama(tied: bool):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tied))


@pytest.mark.parametrize("tied", [True, False])
def test_wrapped_model_loss_and_parameter_gradients_match_the_model_logits(tied):
    """CausalLMWithLoss(chunk) against the model's own logits: same loss, same gradient for every parameter
    (embedding, tied or separate output layer, decoder layers); parameter names unchanged under .lm."""
    model = _tiny_llama(tied)
    tokens = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(1))
    labels = torch.roll(tokens, -1, 1)
    grads = []
    for chunk in (0, 7):
        model.zero_grad(set_to_none=True)
        wrapped = CausalLMWithLoss(model, chunk)
        loss = wrapped(tokens, labels)
        loss.backward()
        grads.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (ref_loss, ref), (loss, got) = grads
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    assert set(got) == set(ref) and all(_rel(got[n], ref[n]) < 1e-5 for n in ref)
    assert {n.removeprefix("lm.") for n in dict(CausalLMWithLoss(model, 7).named_parameters())} == set(ref)


@pytest.mark.parametrize("chunk", [0, 7])
def test_training_forward_and_backward_never_wait_for_the_device(chunk):
    """No operator that reads a tensor's value on the host (on a GPU: a sync that drains the queue) in a micro
    batch's forward and backward, full-logits and chunked: transformers' packed-sequence check is skipped (keizoku's
    positions never restart) and the chunked loss's one-hot is a comparison, not F.one_hot (which checks its range)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class HostReads(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default):
                self.ops.append(func)
            return func(*args, **(kwargs or {}))

    from transformers import masking_utils

    check = masking_utils.find_packed_sequence_indices
    tokens = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(1))
    wrapped = CausalLMWithLoss(_tiny_llama(False), chunk)
    with HostReads() as reads:
        wrapped(tokens, torch.roll(tokens, -1, 1)).backward()
    assert reads.ops == []
    assert masking_utils.find_packed_sequence_indices is check  # put back after the forward


def test_unsupported_output_layers_are_named():
    model = _tiny_llama(False)
    assert chunking_unsupported(model) is None
    model.lm_head.bias = torch.nn.Parameter(torch.zeros(300))
    assert chunking_unsupported(model) == "its output layer has a bias"
    model = _tiny_llama(False)
    model.config.final_logit_softcapping = 30.0
    assert "final_logit_softcapping" in chunking_unsupported(model)
