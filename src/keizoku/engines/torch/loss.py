"""The language-model loss without full-vocabulary logits: the output layer and cross-entropy, chunk by chunk.

A Llama-3 vocabulary (128,256) at seq 8192 × micro batch 2 makes 16,384 × 128,256 logits: 4 GiB in bf16,
another 8 GiB once upcast to fp32 for the loss, and as much again for their gradient, all held at the peak of
activation memory. ``chunked_lm_loss`` computes the output layer and the cross-entropy over ``chunk`` tokens at
a time and, when gradients are wanted, their gradients right away (the hidden states' and the output weight's),
so no more than one chunk's logits ever exists and the backward pass only hands over what was computed. The
matmuls are the same as the unfused loss's (logits, grad of hidden, grad of weight): nothing is recomputed.
The weight's gradient is summed over chunks in fp32.

``CausalLMWithLoss`` puts this behind one module for FSDP2: the Hugging Face model's body runs through its own
modules, then the loss uses the output layer's weight while the root FSDP unit still holds it gathered.

Mixture-of-experts models with a router load-balancing loss (Mixtral, Qwen-MoE, OLMoE, …: transformers' config
has ``router_aux_loss_coef``, the model's forward takes ``output_router_logits``) train with it added
(``router_aux_loss_coef``): the model computes it itself (its module's ``load_balancing_loss_func`` over every
MoE layer's router logits of the micro batch, no attention mask: keizoku's rows are full), exactly as
transformers' own ``loss`` includes it (``loss + router_aux_loss_coef * aux_loss``).
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from typing import Callable

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # F.cross_entropy's default: such labels count neither in the loss nor its gradient


def _chunk_loss_and_grad(logits: torch.Tensor, labels: torch.Tensor, grad_dtype: torch.dtype | None):
    """Sum of token losses of one chunk and, with grad_dtype, d(sum)/d(logits) (softmax − one-hot) in that dtype."""
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1)
    keep = labels != IGNORE_INDEX
    safe = torch.where(keep, labels, 0)
    target = logits.gather(1, safe.unsqueeze(1)).squeeze(1)
    loss = torch.where(keep, lse - target, 0.0).sum()
    if grad_dtype is None:
        return loss, None
    grad = torch.exp(logits - lse.unsqueeze(1))
    # − one-hot written as a comparison: F.one_hot checks its input's range on the host, a sync per chunk in eager
    target_column = torch.arange(logits.size(1), device=logits.device) == safe.unsqueeze(1)
    grad = grad - target_column.to(grad.dtype)
    grad = torch.where(keep.unsqueeze(1), grad, 0.0)
    return loss, grad.to(grad_dtype)


_compiled: Callable | None = None


def _chunk_fn(compile: bool) -> Callable:
    """The per-chunk elementwise work; compiled, it is one or two passes over the chunk's logits instead of ~6."""
    global _compiled
    if not compile:
        return _chunk_loss_and_grad
    if _compiled is None:
        _compiled = torch.compile(_chunk_loss_and_grad, dynamic=False)
    return _compiled


def _add_weight_grad(grad_w: torch.Tensor, g: torch.Tensor, h: torch.Tensor) -> None:
    """grad_w (fp32) += g.T @ h in one GEMM. With bf16 g and h on CUDA, cuBLAS reads them in bf16 and accumulates
    into the fp32 sum (``out_dtype``): on an H200, 14.6 ms for 16,384 tokens × 128,256 × 2048 in chunks of 2048,
    against 19.2 ms for a bf16 product per chunk then an fp32 add, and 1,000× closer to the exact sum
    (bench/gpu/kernels.py). CPUs have no such kernel: there bf16 inputs are upcast (fp32 models, the CPU default,
    take the first branch)."""
    if g.dtype == grad_w.dtype:
        grad_w.addmm_(g.t(), h)
    elif g.is_cuda:
        torch.addmm(grad_w, g.t(), h, out_dtype=grad_w.dtype, out=grad_w)
    else:
        grad_w.addmm_(g.t().to(grad_w.dtype), h.to(grad_w.dtype))


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk: int, compile: bool, grad_wanted: bool):
        want_h, want_w = grad_wanted and ctx.needs_input_grad[0], grad_wanted and ctx.needs_input_grad[1]
        with torch.autocast(hidden.device.type, enabled=False):  # matmuls in the inputs' dtype, as chosen
            return _ChunkedLinearCrossEntropy._forward(ctx, hidden, weight, labels, chunk, compile, want_h, want_w)

    @staticmethod
    def _forward(ctx, hidden, weight, labels, chunk, compile, want_h, want_w):
        fn = _chunk_fn(compile)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if want_h else None
        # the weight gradient is summed over chunks in fp32 by the GEMM itself (see _add_weight_grad): no partial
        # buffer, no extra pass. This runs at the end of the forward, where every layer's activations are held and
        # memory peaks: one fp32 copy of the weight's size (2 GiB for a 128k vocabulary × 4096).
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        for start in range(0, hidden.size(0), chunk):
            h = hidden[start:start + chunk]
            loss, g = fn(h @ weight.t(), labels[start:start + chunk], hidden.dtype if want_h or want_w else None)
            total += loss
            if want_h:
                torch.mm(g, weight, out=grad_h[start:start + chunk])
            if want_w:
                _add_weight_grad(grad_w, g, h)
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype) if want_w else None)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return (grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None,
                grad_w * grad_out.to(grad_w.dtype) if grad_w is not None else None, None, None, None, None)


def chunked_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int,
                    compile: bool = False) -> torch.Tensor:
    """Σ cross_entropy(hidden @ weight.T, labels) over tokens (fp32 scalar), ``chunk`` tokens at a time.

    hidden: (..., H); weight: (V, H); labels: (...), IGNORE_INDEX for tokens that do not count."""
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, not {chunk}")
    h = hidden.reshape(-1, hidden.size(-1))
    w = weight.to(h.dtype)
    grad_wanted = torch.is_grad_enabled() and (h.requires_grad or w.requires_grad)
    return _ChunkedLinearCrossEntropy.apply(h, w, labels.reshape(-1), chunk, compile, grad_wanted)


def full_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The unfused reference: Σ cross_entropy over tokens on fp32 logits."""
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1), reduction="sum")


def chunking_unsupported(model) -> str | None:
    """Why the chunked loss cannot stand in for this model's output layer, or None."""
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        return f"its output layer is a {type(head).__name__}, not a Linear"
    if head.bias is not None:
        return "its output layer has a bias"
    cfg = model.config
    for key in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        if getattr(cfg, key, None) not in (None, 1, 1.0):
            return f"its config sets {key} (a transform of the logits)"
    return None


def has_router_aux_loss(model) -> bool:
    """Whether transformers gives this model a router load-balancing loss (``aux_loss`` with
    ``output_router_logits=True``, weighted by its config's ``router_aux_loss_coef``)."""
    return getattr(model.config, "router_aux_loss_coef", None) is not None and \
        "output_router_logits" in inspect.signature(model.forward).parameters


def router_aux_loss_coef(model, setting: float | None) -> float | None:
    """The weight of the router load-balancing loss to train ``model`` with (``model.router_aux_loss_coef``:
    ``setting``, None for the model config's own), or None: no such loss, or weight 0 (off). ValueError for a
    setting on a model that has no such loss."""
    if not has_router_aux_loss(model):
        if setting is not None:
            raise ValueError(f"model.router_aux_loss_coef: {setting} applies only to mixture-of-experts models with a "
                             f"router load-balancing loss (Mixtral, Qwen-MoE, OLMoE, …); {type(model).__name__} has "
                             "none: leave it unset")
        return None
    coef = float(model.config.router_aux_loss_coef if setting is None else setting)
    return coef or None


class CausalLMWithLoss(torch.nn.Module):
    """A Hugging Face causal LM whose forward returns the summed token loss (fp32 scalar).

    ``chunk`` > 0: the chunked loss on the body's last hidden states; 0: the model's own logits, then
    cross-entropy (for models ``chunking_unsupported`` rejects). ``router_aux``: the forward returns
    (summed token loss, the router load-balancing loss of the batch, unweighted: transformers' ``aux_loss``)
    instead; for models ``has_router_aux_loss`` accepts. The wrapped model keeps its parameter names (``self.lm``),
    so checkpoints and exports are those of the plain model."""

    def __init__(self, lm: torch.nn.Module, chunk: int, compile: bool = False, router_aux: bool = False):
        super().__init__()
        self.lm, self.chunk, self.compile, self.router_aux = lm, chunk, compile, router_aux
        # the output layer on one position per row where the model takes it: the chunked loss needs no logits
        self._keep_one = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(lm.forward).parameters else {}

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor):
        with _positions_not_packed():
            if not self.chunk:
                out = self.lm(input_ids=input_ids, use_cache=False, **self._router_kwargs())
                loss = full_lm_loss(out.logits, labels)
                return (loss, _aux_tensor(out.aux_loss, loss)) if self.router_aux else loss
            body = getattr(self.lm, self.lm.base_model_prefix)  # LlamaModel etc.: the decoder without the output layer
            # use_cache=False: a KV cache in training only costs memory, and its per-layer state makes torch.compile
            # recompile each decoder layer until its recompile limit, after which the remaining layers run eagerly
            if self.router_aux:
                hidden, aux = self._body_and_router_aux(body, input_ids)
            else:
                hidden = body(input_ids=input_ids, use_cache=False).last_hidden_state
        loss = chunked_lm_loss(hidden, self.lm.get_output_embeddings().weight, labels, self.chunk, self.compile)
        return (loss, _aux_tensor(aux, loss)) if self.router_aux else loss

    def _router_kwargs(self) -> dict:
        return {"output_router_logits": True} if self.router_aux else {}

    def _body_and_router_aux(self, body: torch.nn.Module, input_ids: torch.Tensor):
        """(the body's last hidden states, the model's aux_loss): the whole model runs, so that transformers
        computes the load-balancing loss its own way for each family, with the output layer on one position per
        row (``logits_to_keep=1``, where the model takes it), and the body's output is caught on its way."""
        caught = []
        hook = body.register_forward_hook(lambda module, args, output: caught.append(output))
        try:
            out = self.lm(input_ids=input_ids, use_cache=False, **self._router_kwargs(), **self._keep_one)
        finally:
            hook.remove()
        return caught[-1].last_hidden_state, out.aux_loss


def _aux_tensor(aux, loss: torch.Tensor) -> torch.Tensor:
    """transformers' aux_loss as an fp32 scalar beside the loss (it is the int 0 when no layer routed)."""
    if isinstance(aux, torch.Tensor):
        return aux.float()
    return torch.full((), float(aux or 0), device=loss.device)


def _not_packed(position_ids: torch.Tensor) -> None:
    return None


@contextlib.contextmanager
def _positions_not_packed():
    """Transformers checks the position ids of every forward without a KV cache for packed sequences (positions
    that restart inside a row) with an ``.all()`` the CPU must wait for. On a GPU that drains the queue at the start
    of every micro batch, and a forward whose kernels the CPU only just keeps ahead of (FP8) then runs with the GPU
    idle in between: 8B FP8 on 2 GPUs, ~0.2 s of a 2.7 s step (bench/gpu/README.md, sixth session). keizoku's
    positions never restart (documents are concatenated, Megatron's way: positions 0 … seq−1), so the answer is
    known; the check is skipped while keizoku's own forward runs (a transformers without it is left alone)."""
    masking_utils = sys.modules.get("transformers.masking_utils")  # imported by the model's own module
    check = getattr(masking_utils, "find_packed_sequence_indices", None)
    if check is None:
        yield
        return
    masking_utils.find_packed_sequence_indices = _not_packed
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = check
