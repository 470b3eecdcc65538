"""How fast DCP writes a host (pinned) state to local disk: on the training thread, or from a background thread while
the training thread trains, with 1 or N writer threads (``FileSystemWriter(thread_count=N)``); and the disk's own
speed (one file, written and fsynced). Finds what limits a background checkpoint's write (the disk, DCP's writer,
or the training thread's GIL); ``checkpoint_stall.py`` measures the whole save through ``keizoku train``.

  python3 bench/scale/write_speed.py --gib 20 --work /tmp/ws --writers 1 8 --out $OUT

Rows: ``disk`` (raw), ``dcp idle wN`` (the writer alone), ``dcp training wN`` (the writer in a thread while the main
thread runs forward/backward/AdamW of a 0.3B Llama on the GPU; the training's steps/s beside its idle rate).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter


def host_state(gib: float) -> dict:
    """Tensors of a Llama layer's shapes (4096 x 4096 / 14336 x 4096, fp32), pinned when a GPU is there."""
    state, total, i = {}, 0, 0
    while total < gib * 2**30:
        shape = (4096, 4096) if i % 3 else (14336, 4096)
        t = torch.empty(shape, pin_memory=torch.cuda.is_available())
        t.copy_(torch.randn(shape, device="cuda") if torch.cuda.is_available() else torch.randn(shape))
        state[f"layers.{i}.weight"] = t
        total += t.numel() * 4
        i += 1
    return state


def disk_speed(work: Path, gib: float) -> float:
    block = bytearray(os.urandom(1 << 20)) * 64  # 64 MiB
    path = work / "disk.bin"
    start = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(int(gib * 16)):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    elapsed = time.perf_counter() - start
    path.unlink()
    return elapsed


def trainer():
    """A small GPU training step, Python-heavy like a real one (many kernels, autograd, AdamW)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=16, num_attention_heads=16,
                      num_key_value_heads=8, vocab_size=32000)
    model = LlamaForCausalLM(cfg).cuda().to(torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
    ids = torch.randint(0, 32000, (4, 1024), device="cuda")

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
    return step


def dcp_write(state: dict, path: Path, writers: int, step=None) -> tuple[float, float | None]:
    shutil.rmtree(path, ignore_errors=True)
    start = time.perf_counter()
    if step is None:
        dcp.save(state, storage_writer=FileSystemWriter(str(path), thread_count=writers))
        return time.perf_counter() - start, None
    error = []

    def write():
        try:
            dcp.save(state, storage_writer=FileSystemWriter(str(path), thread_count=writers))
        except BaseException as e:  # reported below
            error.append(e)
    thread = threading.Thread(target=write)
    thread.start()
    steps = 0
    while thread.is_alive():
        step()
        steps += 1
    thread.join()
    elapsed = time.perf_counter() - start
    if error:
        raise error[0]
    return elapsed, steps / elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gib", type=float, default=20)
    p.add_argument("--work", default="/tmp/ws")
    p.add_argument("--writers", type=int, nargs="+", default=[1, 8])
    p.add_argument("--out", default=os.environ.get("OUT"))
    a = p.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    dist.init_process_group("gloo", rank=0, world_size=1)
    rows = []

    def report(name, seconds, **extra):
        rows.append({"row": name, "gib": a.gib, "s": seconds, "gb_per_s": a.gib * 2**30 / 1e9 / seconds, **extra})
        print(json.dumps(rows[-1]), flush=True)

    report("disk", disk_speed(work, a.gib))
    state = host_state(a.gib)
    step = trainer() if torch.cuda.is_available() else None
    if step is not None:
        step()
        start, n = time.perf_counter(), 0
        while time.perf_counter() - start < 5:
            step()
            n += 1
        idle_rate = n / (time.perf_counter() - start)
    for writers in a.writers:
        report(f"dcp idle w{writers}", dcp_write(state, work / "ck", writers)[0])
        if step is not None:
            seconds, rate = dcp_write(state, work / "ck", writers, step)
            report(f"dcp training w{writers}", seconds, steps_per_s=rate, idle_steps_per_s=idle_rate)
    shutil.rmtree(work / "ck", ignore_errors=True)
    if a.out:
        Path(a.out, "write-speed.json").write_text(json.dumps(rows, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
