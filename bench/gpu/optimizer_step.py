"""One optimizer step on one GPU's FSDP2 shards of a Llama shape: how long the GPU waits for it (one GPU).

Why: in the 8B FP8 profile the step's ``Optimizer.step`` spans 83.6 ms on the GPU while its kernels need ~20: the
CPU launches the bf16-moment update parameter by parameter after the step's one host sync, and the GPU idles
(bench/gpu/README.md, seventh session). This builds the dim-0 shards one rank holds under ``--world``-way FSDP2
(fp32 parameters and gradients, as the trainer's optimizer sees them), then times ``optimizer.step()`` side by
side for the variants: ``fused`` (torch AdamW, fp32 moments, ``fused=True``: what ``optim.state_dtype: fp32``
runs), ``bf16-group=N`` (keizoku's ``AdamWLowPrecisionState``, compiled, N parameters of one layout per compiled
call; the engine's is ``GROUP``), ``bf16-eager``. Reported per variant: the first step (compiles), then the median
over ``--repeat`` steps of the CPU's time to return from ``step()`` and of the time until the GPU has finished it
(host sync before and after: the GPU starts idle, as after the trainer's sync).

  python3 bench/gpu/optimizer_step.py --shape 8b --world 2 --variants fused bf16-group=1 bf16-group=8 bf16-eager
  python3 bench/gpu/optimizer_step.py --shape tiny --device cpu --variants fused bf16-group=8    (plumbing check on a CPU)
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import SHAPES, llama_config


def shard_shapes(shape: str, world: int) -> list[tuple[str, tuple[int, ...]]]:
    """(name, local shard shape) of every parameter of the Llama model (built on the meta device, as the benchmark
    builds it): FSDP2 shards dim 0 into ``world`` chunks."""
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config(shape, 8192))
    return [(name, (-(-p.shape[0] // world), *p.shape[1:])) for name, p in model.named_parameters()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    p.add_argument("--world", type=int, default=2, help="FSDP2 ranks the model is sharded over")
    p.add_argument("--variants", nargs="+", default=["fused", "bf16-group=1", "bf16-group=8", "bf16-eager"])
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--device", default="cuda")
    a = p.parse_args()

    import torch

    from keizoku.engines.torch.optim import AdamWLowPrecisionState, param_groups

    cuda = a.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    shapes = shard_shapes(a.shape, a.world)
    print(f"{a.shape}, 1/{a.world} shards: {len(shapes)} parameters, "
          f"{sum(torch.Size(s).numel() for _, s in shapes) / 1e9:.2f} B values; torch {torch.__version__}")
    rows = []
    for variant in a.variants:
        model = torch.nn.Module()
        for name, shape in shapes:
            model.register_parameter(name.replace(".", "_"), torch.nn.Parameter(
                torch.randn(shape, device=a.device) * 0.02))
        for param in model.parameters():
            param.grad = torch.randn_like(param) * 1e-3
        groups = param_groups(model, 0.1)
        if variant == "fused":
            opt = torch.optim.AdamW(groups, lr=1e-4, fused=cuda or None)
        elif variant.startswith("bf16"):
            opt = AdamWLowPrecisionState(groups, lr=1e-4, compile=variant != "bf16-eager")
            if variant.startswith("bf16-group="):
                opt.GROUP = int(variant.partition("=")[2])
        else:
            p.error(f"unknown variant {variant!r}")
        sync()
        t0 = time.perf_counter()
        opt.step()
        sync()
        first = time.perf_counter() - t0
        opt.step()
        cpu, total = [], []
        for _ in range(a.repeat):
            sync()
            t0 = time.perf_counter()
            opt.step()
            cpu.append(time.perf_counter() - t0)
            sync()
            total.append(time.perf_counter() - t0)
        row = dict(variant=variant, first_step_s=round(first, 2), cpu_ms=round(statistics.median(cpu) * 1e3, 1),
                   gpu_done_ms=round(statistics.median(total) * 1e3, 1),
                   peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 1) if cuda else None)
        rows.append(row)
        print(row, flush=True)
        del opt, model, groups
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    print(f"\n{'variant':16} {'first step s':>12} {'CPU ms':>8} {'GPU done ms':>12}")
    for r in rows:
        print(f"{r['variant']:16} {r['first_step_s']:12.2f} {r['cpu_ms']:8.1f} {r['gpu_done_ms']:12.1f}")


if __name__ == "__main__":
    main()
