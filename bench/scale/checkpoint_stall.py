"""Training stall per checkpoint save (engine: torch): saving before training goes on against saving in the
background, side by side in one call, through the real `keizoku train` path.

Each variant trains a randomly initialised Llama shape (``--shape``) in its own process (under torchrun with
``--world N``), saving every ``--interval`` steps; one after the other:

  sync     this checkout, ``checkpoint.background=false``: DCP writes, rank 0 commits, then training goes on
  async    this checkout: the state is copied to (pinned) host memory, training goes on, DCP writes it in the
           background and rank 0 commits once every rank has written (``keizoku.engines.torch.checkpoint``)
  base     the keizoku source tree of ``--baseline-src`` (e.g. the commit before: ``git archive <commit> src | tar
           -x -C .bench-gpu/base``), whatever its save does

Measured on rank 0 with a global optimizer-step hook (so any keizoku version runs unchanged): the period from one
optimizer step to the next, which holds the save of the step before it.

  step s      median period of the steps before the first save (nothing in flight, past --warmup)
  stall s     the saving step's period minus that: how long the save held training up
  overhead s  the extra time of the whole interval from a save to the next (the saving step and the steps during
              which the write goes on): what one save costs the run, contention with the write included
  publish s   from the saving step's optimizer step to the checkpoint's appearance under its final name

The first save (host buffers allocated, DCP's plan made) is reported apart from the median over the others.
Checkpoints are deleted as soon as they are published (the bench keeps none), so the disk holds one at a time:
fp32 AdamW state is 12 bytes a parameter (3B: 38 GB, fits the 1-GPU machine's 64 GiB disk; 8B: 96 GB, several GPUs).

  python3 bench/scale/checkpoint_stall.py --shape 3b --seq 4096 --micro 1 --global-batch 4 --interval 5 --saves 3
  ... --shape 8b --world 4       (under torchrun, 4 GPUs)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, SHAPES, keizoku_config, rank, write_model_dir  # noqa: E402


# --- one variant, in its own process (every rank) ---------------------------------------------------------

def run_variant(a) -> dict | None:
    """Train with saves every ``a.interval`` steps; rank 0 returns the measurements."""
    import yaml
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from keizoku import config, engines

    load_config = getattr(config, "load_config", None) or config.load  # trees from before issue 19: load, run
    train_engine = getattr(engines, "train", None) or engines.run
    work = Path(a.workdir)
    steps = a.interval * (a.saves + 1)  # the last one is saved too, but its period is not measured
    if not rank():
        cfg = keizoku_config(work / "run", work / "model", Path(a.data), a.seq, a.micro, a.global_batch, steps)
        cfg["checkpoint"] = {"interval": a.interval, "keep_last": 1, "save_at_end": False}
        write_model_dir(work / "model", a.shape, a.seq)
        (work / "cfg.tmp").write_text(yaml.safe_dump(cfg))
        (work / "cfg.tmp").rename(work / "cfg.yaml")
    while not (work / "cfg.yaml").exists():
        time.sleep(0.2)
    stepped: list[float] = []  # time of each optimizer step's end
    register_optimizer_step_post_hook(lambda *_: stepped.append(time.perf_counter()))
    published: dict[int, float] = {}
    watcher = PublishWatcher(work / "run/checkpoints", published) if not rank() else None
    overrides = list(a.overrides) + (["checkpoint.background=false"] if a.one == "sync" else [])
    code = train_engine(load_config(work / "cfg.yaml", overrides))
    if watcher is not None:
        watcher.stop()
    if code:
        raise SystemExit(f"keizoku train exited {code}")
    return None if rank() else measurements(a, stepped, published)


class PublishWatcher:
    """Notes when each ``step_N`` appears under its final name, then deletes it (renamed away first, as keizoku's
    pruning does, so neither keizoku version sees a half-deleted checkpoint)."""

    def __init__(self, checkpoints: Path, published: dict[int, float]):
        self.checkpoints, self.published, self.done = checkpoints, published, threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        import shutil

        while not self.done.wait(0.05):
            for d in list(self.checkpoints.glob("step_*")) if self.checkpoints.is_dir() else []:
                self.published.setdefault(int(d.name.split("_")[1]), time.perf_counter())
                trash = d.with_name(f".tmp-bench-{d.name}")
                try:
                    os.replace(d, trash)
                except OSError:  # pruned meanwhile
                    continue
                shutil.rmtree(trash, ignore_errors=True)

    def stop(self) -> None:
        self.done.set()
        self.thread.join()


def measurements(a, stepped: list[float], published: dict[int, float]) -> dict:
    """Periods → the stall figures. period[i]: from step i's optimizer step to step i+1's, so it holds whatever
    ran after step i (its save)."""
    period = {i: stepped[i] - stepped[i - 1] for i in range(1, len(stepped))}
    base = statistics.median(period[i] for i in range(a.warmup + 1, a.interval))
    saves = []
    for s in range(a.interval, a.interval * (a.saves + 1), a.interval):
        saves.append({"step": s, "stall_s": period[s] - base,
                      "overhead_s": sum(period[i] - base for i in range(s, s + a.interval)),
                      "publish_s": published[s] - stepped[s - 1] if s in published else None})
    later = saves[1:] or saves
    return {"shape": a.shape, "gpus": a.world, "seq": a.seq, "global_batch": a.global_batch, "step_s": base,
            "first_stall_s": saves[0]["stall_s"], "first_overhead_s": saves[0]["overhead_s"],
            "stall_s": statistics.median(x["stall_s"] for x in later),
            "overhead_s": statistics.median(x["overhead_s"] for x in later),
            "publish_s": statistics.median(x["publish_s"] for x in later if x["publish_s"] is not None),
            "saves": saves}


# --- driver ------------------------------------------------------------------------------------------------

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="3b")
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--micro", type=int, default=1)
    p.add_argument("--global-batch", type=int, default=4, help="per step, all GPUs")
    p.add_argument("--interval", type=int, default=5, help="save every N steps")
    p.add_argument("--saves", type=int, default=3, help="saves measured (the first reported apart)")
    p.add_argument("--warmup", type=int, default=2, help="steps left out of the step time (< interval - 2)")
    p.add_argument("--world", type=int, default=1, help="GPUs (torchrun --nproc-per-node)")
    p.add_argument("--variants", nargs="+", choices=["sync", "async", "base"], default=["sync", "async"])
    p.add_argument("--baseline-src", help="the keizoku source tree the base variant runs")
    p.add_argument("--data", default=str(ROOT / ".bench-gpu/data"), help="keizoku-tokenized samples")
    p.add_argument("--out", default=os.environ.get("OUT"))
    p.add_argument("overrides", nargs="*", help="keizoku config overrides, e.g. model.activation_checkpointing=full")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one variant in this process
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.warmup > a.interval - 3:
        p.error("--warmup must leave at least two steps before the first save (--interval > warmup + 2)")
    if a.one:
        row = run_variant(a)
        if row is not None:
            print("RESULT " + json.dumps(row), flush=True)
        return
    if "base" in a.variants and not a.baseline_src:
        p.error("variant base needs --baseline-src")
    results = [r for v in a.variants if (r := run_one(a, v)) is not None]
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        Path(a.out, "checkpoint-stall.json").write_text(json.dumps(results, indent=1))
    print(f"\n{'variant':8} {'shape':5} {'GPUs':>4} {'step s':>7} {'stall s':>8} {'overhead s':>10} "
          f"{'publish s':>9}   first save: stall / overhead s")
    for r in results:
        print(f"{r['variant']:8} {r['shape']:5} {r['gpus']:>4} {r['step_s']:7.2f} {r['stall_s']:8.2f} "
              f"{r['overhead_s']:10.2f} {r['publish_s']:9.2f}   {r['first_stall_s']:.2f} / {r['first_overhead_s']:.2f}")


def run_one(a, variant: str) -> dict | None:
    launcher = [sys.executable] if a.world == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={a.world}"]
    cmd = [*launcher, __file__, *sys.argv[1:], "--one", variant, "--workdir", tempfile.mkdtemp(prefix="kz-stall-")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    if variant == "base":
        env["PYTHONPATH"] = os.pathsep.join([str(Path(a.baseline_src).resolve()), os.environ.get("PYTHONPATH", "")])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        Path(a.out, f"log-stall-{variant}.txt").write_text(proc.stdout + proc.stderr)
    rows = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not rows:
        print(f"--- {variant} failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}", flush=True)
        return None
    row = {"variant": variant, **rows[0]}
    print(json.dumps(row), flush=True)
    return row


if __name__ == "__main__":
    main()
