"""Micro-benchmarks of two kernels behind the training step, at the benchmark's shapes (one GPU):

1. attention forward + backward through ``F.scaled_dot_product_attention`` (causal, GQA as transformers calls it)
   with each backend torch has (cuDNN, flash, memory-efficient) and FlexAttention (compiled): which one the engine
   should ask for. TFLOP/s counts the causal FLOPs actually needed (half of the 12·L·H·S convention's full square).
2. the chunked loss's output-weight gradient, summed over chunks: the bf16 partial + fp32 add that the engine does
   on a CPU against one cuBLAS GEMM that accumulates into the fp32 sum (``torch.addmm(..., out_dtype=float32)``),
   time and error against an fp64 sum.

  python3 bench/gpu/kernels.py [--out DIR]      (results printed and, with --out, written as kernels.json)
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F


def timed(fn, repeat: int = 10) -> float:
    """Median seconds of fn() over `repeat` runs after two warm-ups, by CUDA events."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def attention(batch: int, heads: int, kv_heads: int, seq: int, dim: int) -> list[dict]:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    shape = dict(batch=batch, heads=heads, kv_heads=kv_heads, seq=seq, head_dim=dim)
    q = torch.randn(batch, heads, seq, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(batch, kv_heads, seq, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn_like(k, requires_grad=True)
    grad = torch.randn_like(q)
    causal_fwd = 4 * batch * heads * seq * seq * dim / 2
    flops = causal_fwd * 3.5  # backward: 2.5 × forward

    def sdpa(backend, gqa: bool):
        def run():
            kk, vv = (k, v) if gqa else (k.repeat_interleave(heads // kv_heads, 1), v.repeat_interleave(heads // kv_heads, 1))
            with sdpa_kernel([backend]):
                out = F.scaled_dot_product_attention(q, kk, vv, is_causal=True, enable_gqa=gqa)
            out.backward(grad)
        return run

    block_mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, seq, seq, device="cuda")
    flex = torch.compile(flex_attention, dynamic=False)

    def run_flex():
        flex(q, k, v, block_mask=block_mask, enable_gqa=True).backward(grad)

    rows = []
    for name, fn in [("cudnn", sdpa(SDPBackend.CUDNN_ATTENTION, True)), ("cudnn-repeat-kv", sdpa(SDPBackend.CUDNN_ATTENTION, False)),
                     ("flash", sdpa(SDPBackend.FLASH_ATTENTION, True)), ("efficient", sdpa(SDPBackend.EFFICIENT_ATTENTION, True)),
                     ("flex", run_flex)]:
        try:
            s = timed(fn)
            rows.append({**shape, "backend": name, "fwd_bwd_ms": s * 1e3, "tflops": flops / s / 1e12})
        except Exception as e:  # a backend that refuses the shape says why
            rows.append({**shape, "backend": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"})
        print(rows[-1], flush=True)
    return rows


def weight_grad_sum(tokens: int, chunk: int, vocab: int, hidden: int) -> list[dict]:
    torch.manual_seed(0)
    g = torch.randn(tokens, vocab, device="cuda", dtype=torch.bfloat16) * 1e-3
    h = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
    exact = torch.zeros(vocab, hidden, device="cuda", dtype=torch.float64)
    for s in range(0, tokens, chunk):
        exact += g[s:s + chunk].t().double() @ h[s:s + chunk].double()
    grad_w = torch.zeros(vocab, hidden, device="cuda", dtype=torch.float32)
    partial = torch.empty(vocab, hidden, device="cuda", dtype=torch.bfloat16)

    def bf16_partial_then_add():
        grad_w.zero_()
        for s in range(0, tokens, chunk):
            torch.mm(g[s:s + chunk].t(), h[s:s + chunk], out=partial)
            grad_w.add_(partial)

    def fp32_accumulating_gemm():
        grad_w.zero_()
        for s in range(0, tokens, chunk):
            torch.addmm(grad_w, g[s:s + chunk].t(), h[s:s + chunk], out_dtype=torch.float32, out=grad_w)

    rows = []
    gemm_flops = 2 * tokens * vocab * hidden
    for name, fn in [("bf16-partial+fp32-add", bf16_partial_then_add), ("addmm-fp32-accumulate", fp32_accumulating_gemm)]:
        try:
            s = timed(fn)
            fn()
            err = ((grad_w.double() - exact).abs().max() / exact.abs().max()).item()
            rows.append({"tokens": tokens, "chunk": chunk, "vocab": vocab, "hidden": hidden, "method": name,
                         "ms": s * 1e3, "tflops": gemm_flops / s / 1e12, "max_rel_error": err})
        except Exception as e:
            rows.append({"method": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT"))
    a = p.parse_args()
    result = {"card": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "attention": attention(2, 32, 8, 8192, 64) + attention(1, 32, 8, 8192, 128),  # 1B (micro 2), 8B
              "weight_grad_sum": weight_grad_sum(16384, 2048, 128256, 2048) + weight_grad_sum(8192, 2048, 128256, 4096)}
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "kernels.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
