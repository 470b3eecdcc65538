"""One Llama decoder layer under ``model.fp8``, as the engine builds it, kernel by kernel (one GPU).

Why: the 8B FP8 step spends ~0.4 s in torchao's amax/cast kernels (bench/gpu/README.md). This builds one decoder
layer at the benchmark's shape, converts it with keizoku's own ``float8.convert`` and checkpointing wrapper,
compiles it as the engine does (``layer.compile()``), and runs forward + backward on one micro batch, weights in
bf16 as FSDP gathers them (without FSDP the FP8 weight casts run inside the layer, ``triton_poi_fused__to_copy_t_*``;
in training they run once per gather, before it). It reports the step's time, each GPU kernel's time (profiled,
summed over the calls in one forward + backward), and keeps inductor's generated code (the Triton kernels) in
``--out/inductor-code.tgz``; with ``--kernel-bandwidth`` it also runs each generated module's own kernel benchmark
(``TORCHINDUCTOR_BENCHMARK_KERNEL=1``, ``python <module>.py -k``: ms, GB moved and GB/s per Triton kernel). First
finding (H200): the layer's Triton kernels move 9.6 GB in 3.0 ms, 3.15 TB/s on average: the bytes, not slow
kernels, are most of the cost.
``--inductor KEY=VALUE`` sets a ``torch._inductor.config`` option first (e.g. ``coordinate_descent_tuning=True``),
to try a code-generation setting on the layer before changing the engine.

  python3 bench/gpu/fp8_layer.py --shape 8b --seq 8192 --recompute selective --out $OUT [--kernel-bandwidth]
  python3 bench/gpu/fp8_layer.py --inductor coordinate_descent_tuning=True --out $OUT/cdt
  python3 bench/gpu/fp8_layer.py --shape tiny --seq 64 --device cpu --fp8-layers all      (plumbing check on a CPU)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import SHAPES, llama_config


def build(shape: str, seq: int, fp8: str, fp8_layers: str, recompute_mode: str, device: str, compile: bool):
    import torch
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    from keizoku.engines.torch import float8, recompute

    config = llama_config(shape, seq)
    config._attn_implementation = "sdpa"
    # bf16 weights, as FSDP's mixed precision gathers them for compute (the fp32 masters stay in the shards)
    layer = LlamaDecoderLayer(config, layer_idx=0).to(device, torch.bfloat16)
    layers = torch.nn.ModuleList([layer])
    swapped = float8.convert(layers, fp8, False, fp8_layers)[0] if fp8 != "none" else 0
    wrapped = recompute.wrap(layers[0], recompute_mode)
    if compile:
        wrapped.compile()
    return wrapped, LlamaRotaryEmbedding(config).to(device), swapped


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--fp8", choices=("tensorwise", "rowwise", "none"), default="tensorwise")
    p.add_argument("--fp8-layers", choices=("auto", "all"), default="auto")
    p.add_argument("--recompute", choices=("none", "selective", "full"), default="selective")
    p.add_argument("--device", default="cuda")
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--kernel-bandwidth", action="store_true")
    p.add_argument("--inductor", action="append", default=[], metavar="KEY=VALUE",
                   help="a torch._inductor.config option (Python literal value), repeatable")
    p.add_argument("--out", default=os.environ.get("OUT"))
    a = p.parse_args()
    code_dir = Path(os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="kz-inductor-")))
    if a.kernel_bandwidth:
        os.environ["TORCHINDUCTOR_BENCHMARK_KERNEL"] = "1"
    os.environ.setdefault("TORCHINDUCTOR_UNIQUE_KERNEL_NAMES", "1")

    import ast

    import torch
    import torch._inductor.config
    from torch.profiler import ProfilerActivity, profile

    for option in a.inductor:
        key, _, value = option.partition("=")
        if not hasattr(torch._inductor.config, key):
            p.error(f"--inductor {option}: torch._inductor.config has no {key!r}")
        setattr(torch._inductor.config, key, ast.literal_eval(value))
    cuda = a.device.startswith("cuda")
    layer, rotary, swapped = build(a.shape, a.seq, a.fp8, a.fp8_layers, a.recompute, a.device, compile=cuda)
    hidden = SHAPES[a.shape]["hidden_size"]
    label = f"{a.shape} seq {a.seq} fp8 {a.fp8} ({swapped} linear layers) recompute {a.recompute}" + \
        "".join(f" {option}" for option in a.inductor)
    x = torch.randn(1, a.seq, hidden, device=a.device, dtype=torch.bfloat16, requires_grad=True)
    positions = torch.arange(a.seq, device=a.device)[None]
    grad = torch.randn_like(x)

    def step():
        layer.zero_grad(set_to_none=True)  # FSDP hands each micro batch's gradients to its reduce-scatter
        out = layer(x, position_embeddings=rotary(x, positions), position_ids=positions)
        out = out[0] if isinstance(out, tuple) else out
        out.backward(grad)

    for _ in range(3):
        step()
    if cuda:
        torch.cuda.synchronize()
        times = []
        for _ in range(a.repeat):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        print(f"{label}: forward + backward {sorted(times)[len(times) // 2]:.2f} ms (median of {a.repeat})")
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=40, max_name_column_width=90))
    else:
        print(f"{label}: ran on {a.device}")

    modules = sorted(f for f in code_dir.rglob("*.py") if "benchmark_compiled_module" in f.read_text(errors="ignore"))
    if a.kernel_bandwidth:
        for module in modules:
            print(f"== {module.name}: inductor's per-kernel benchmark", flush=True)
            subprocess.run([sys.executable, str(module), "-k"], check=False)
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        with tarfile.open(Path(a.out) / "inductor-code.tgz", "w:gz") as tar:
            for module in modules:
                tar.add(module, arcname=module.name)
        print(f"{len(modules)} generated modules in {Path(a.out) / 'inductor-code.tgz'}")


if __name__ == "__main__":
    main()
