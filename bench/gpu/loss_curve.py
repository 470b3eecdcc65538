"""Do low-precision variants (FP8 matmuls, bf16 optimizer state, ...) train like the BF16 reference?

Trains several `keizoku train` runs of one Llama shape from random weights (``model.init: random``) on the same
tokenized data, same data order and (unless a run overrides it) the same init seed; each run is a spec
``NAME[:key=value,key=value]`` of keizoku config overrides. Runs go concurrently, one per group of
``--gpus-per-run`` GPUs (``CUDA_VISIBLE_DEVICES`` set per run; torchrun when a group has more than one GPU), as
many at once as there are groups; on a machine without GPUs they run one after another. Each run is its own
process on the real path: ``python -m keizoku train CFG.yaml OVERRIDES``.

The first run is the reference. The noise is how far a second seed of the reference (``--noise-run``) lands
from it: a variant is "within noise" when its mean |Δ| to the reference (smoothed loss, second half of the
steps) is at most the noise run's mean |Δ| over the same steps. Written to --out: loss_curve.json (specs,
per-step loss/grad norm/lr, tokens/s, summary), loss_curve.png, runs/NAME/{train.log, cfg.yaml, run/metrics.jsonl}.
``--report OUT`` redoes the summary and plot from what an earlier (possibly cut-short) call left in OUT.

  python3 bench/gpu/loss_curve.py --shape 1b --seq 8192 --micro 2 --global-batch 4 --steps 250 \\
      --data .bench-gpu/data-llama31 --tokenizer .bench-gpu/tokenizer-llama31 --noise-run bf16-seed2 \\
      --runs bf16 bf16-seed2:train.seed=2 fp8:model.fp8=tensorwise bf16state:optim.state_dtype=bf16 --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import ROOT, SHAPES, keizoku_config, write_model_dir

from keizoku.rundir import read_jsonl

TIMING_SKIP_STEPS = 5  # compile and allocator warm-up: left out of the tokens/s median
DELTA = ".2g"  # loss differences: two significant digits, whether 0.031 or 2.5e-06
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


class BenchError(Exception):
    """Bad arguments or inputs; the message says which and what was expected."""


@dataclass
class RunSpec:
    name: str
    overrides: list[str]


def parse_run(text: str) -> RunSpec:
    name, _, rest = text.partition(":")
    # split at commas that start a new key=value, so values such as optim.betas=[0.9,0.95] stay whole
    overrides = [o for o in re.split(r",(?=[A-Za-z_][\w.]*=)", rest) if o] if rest else []
    if not NAME.fullmatch(name) or any("=" not in o for o in overrides):
        raise BenchError(f"--runs {text!r}: expected NAME or NAME:key.path=value[,key.path=value] (NAME of letters, "
                         "digits, . _ + -)")
    return RunSpec(name, overrides)


# --- inputs ------------------------------------------------------------------------------------------------

def check_inputs(a) -> None:
    """Fail before any training: missing datasets, a tokenizer not the data's, ids beyond the shape's vocabulary."""
    from keizoku.data.tokenizer import load_tokenizer, tokenizer_fingerprint

    data, tokenizer = Path(a.data), Path(a.tokenizer)
    for prefix in ("ja_sample_text_document", "en_sample_text_document"):
        for ext in (".bin", ".idx"):
            if not (data / (prefix + ext)).is_file():
                raise BenchError(f"--data {data}: {prefix}{ext} is missing (expected keizoku tokenize output of "
                                 "ja_sample.jsonl.gz and en_sample.jsonl.gz; see bench/gpu/README.md)")
    if not (tokenizer / "tokenizer.json").is_file() and not (tokenizer / "tokenizer.model").is_file():
        raise BenchError(f"--tokenizer {tokenizer}: no tokenizer.json or tokenizer.model (a Hugging Face tokenizer "
                         "directory was expected)")
    tok = load_tokenizer(str(tokenizer))
    vocab = SHAPES[a.shape]["vocab_size"]
    if tok.vocab_size > vocab:
        raise BenchError(f"--tokenizer {tokenizer}: {tok.vocab_size} tokens, more than --shape {a.shape}'s vocabulary "
                         f"({vocab})")
    manifest = data / "keizoku-manifest.json"
    if manifest.is_file():  # written by keizoku tokenize: says which tokenizer made the ids
        fingerprint = tokenizer_fingerprint(tok)
        for name, entry in json.loads(manifest.read_text())["datasets"].items():
            made_by = entry.get("tokenizer", {})
            if made_by.get("fingerprint") not in (None, fingerprint):
                raise BenchError(f"{manifest}: datasets.{name}.tokenizer is {made_by.get('name_or_path')!r} "
                                 f"(fingerprint {made_by['fingerprint'][:12]}), not --tokenizer {tokenizer} "
                                 f"({fingerprint[:12]}): tokenize with the same tokenizer or pass the right one")


def device_groups(gpus: int | None, per_run: int) -> list[list[str] | None]:
    """GPU id groups, one run at a time on each; [None] on a machine without GPUs (runs one after another)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [x.strip() for x in visible.split(",") if x.strip()]
    else:
        import torch

        ids = [str(i) for i in range(torch.cuda.device_count())]
    if gpus is not None:
        if gpus > len(ids):
            raise BenchError(f"--gpus {gpus}: only {len(ids)} visible")
        ids = ids[:gpus]
    if not ids:
        return [None]
    if len(ids) < per_run:
        raise BenchError(f"--gpus-per-run {per_run}: only {len(ids)} GPUs visible")
    return [ids[i:i + per_run] for i in range(0, len(ids) - per_run + 1, per_run)]


# --- runs --------------------------------------------------------------------------------------------------

def run_dir(out: Path, name: str) -> Path:
    return out / "runs" / name


def launch(spec: RunSpec, devices: list[str] | None, a, out: Path, model_dir: Path) -> int:
    """One `keizoku train` process (torchrun over the group's GPUs when there are several); its log to train.log."""
    import yaml

    here = run_dir(out, spec.name)
    cfg = keizoku_config(here / "run", model_dir, Path(a.data).resolve(), a.seq, a.micro, a.global_batch, a.steps)
    cfg["optim"] = {"lr": a.lr, "min_lr": a.min_lr}
    cfg["schedule"] = {"kind": "cosine", "warmup_steps": a.warmup}
    (here / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    train = ["-m", "keizoku", "train", str(here / "cfg.yaml"), *spec.overrides]
    env = dict(os.environ)
    if devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
    world = len(devices) if devices else a.gpus_per_run  # on a CPU: that many gloo processes
    cmd = [sys.executable, *train] if world == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}", *train]
    print(f"start  {spec.name}: {' '.join(spec.overrides) or '(no overrides)'} on "
          f"{'GPU ' + ','.join(devices) if devices else 'the CPU'}", flush=True)
    t0 = time.perf_counter()
    with open(here / "train.log", "w") as log:
        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, check=False).returncode
    status = {"exit": code, "wall_s": round(time.perf_counter() - t0, 1), "devices": devices, "command": cmd}
    (here / "status.tmp").write_text(json.dumps(status))
    (here / "status.tmp").rename(here / "status.json")
    if code:
        lines = (here / "train.log").read_text(errors="replace").splitlines()
        # under torchrun the cause comes before the agent's own "failed (exitcode ...)" report and traceback
        end = next((i for i, line in enumerate(lines) if "failed (exitcode" in line), len(lines))
        tail = lines[max(0, end - 40):end]
        print(f"--- {spec.name} FAILED (exit {code}); last lines of {here / 'train.log'}:\n" + "\n".join(tail),
              flush=True)
    else:
        print(f"done   {spec.name} in {status['wall_s']:.0f} s", flush=True)
    return code


def train_records(out: Path, name: str) -> list[dict]:
    return [r for r in read_jsonl(run_dir(out, name) / "run/metrics.jsonl") if r.get("kind") == "train"]


def progress(out: Path, specs: list[RunSpec], steps: int, t0: float) -> None:
    parts = []
    for s in specs:
        train = train_records(out, s.name)
        if train and not (run_dir(out, s.name) / "status.json").exists():
            parts.append(f"{s.name} {train[-1]['step']}/{steps} loss {train[-1]['loss']:.3f}")
    if parts:
        print(f"[{time.perf_counter() - t0:6.0f} s] " + " · ".join(parts), flush=True)


# --- summary -----------------------------------------------------------------------------------------------

def smooth(values: list[float], window: int) -> list[float]:
    """Trailing window mean (the first window-1 points average what there is)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def delta_stats(ref: dict[int, float], run: dict[int, float], steps: list[int]) -> dict:
    deltas = [run[s] - ref[s] for s in steps]
    return {"mean_abs_delta": statistics.fmean(abs(d) for d in deltas), "max_abs_delta": max(abs(d) for d in deltas),
            "mean_delta": statistics.fmean(deltas), "compared_steps": [steps[0], steps[-1]]}


def collect(out: Path, plan: dict) -> dict:
    """loss_curve.json's content from what the runs left on disk (also for cut-short calls)."""
    a = plan["args"]
    window, steps = a["smooth"], a["steps"]
    runs, curves = [], {}
    for spec in (RunSpec(**s) for s in plan["runs"]):
        train = train_records(out, spec.name)
        status_file = run_dir(out, spec.name) / "status.json"
        status = json.loads(status_file.read_text()) if status_file.is_file() else None
        timed = [r["tokens_per_s_per_device"] for r in train[TIMING_SKIP_STEPS:]] or \
            [r["tokens_per_s_per_device"] for r in train]
        state = "pending" if status is None and not train else "unfinished" if status is None else \
            "failed" if status["exit"] else "ok" if len(train) == steps else "incomplete"
        runs.append({"name": spec.name, "overrides": spec.overrides, "state": state,
                     "exit": status and status["exit"], "wall_s": status and status["wall_s"],
                     "devices": status and status["devices"], "steps_done": len(train),
                     "tokens_s_per_gpu": statistics.median(timed) if timed else None,
                     "peak_mem_gib": max((r.get("memory_gib", 0.0) for r in train), default=None),
                     "step": [r["step"] for r in train], "loss": [r["loss"] for r in train],
                     "grad_norm": [r["grad_norm"] for r in train], "lr": [r["lr"] for r in train]})
        if train:
            curves[spec.name] = dict(zip((r["step"] for r in train), smooth([r["loss"] for r in train], window)))
    return {"complete": all(r["state"] == "ok" for r in runs), "setup": plan["setup"], "args": a,
            "runs": runs, "summary": summarise(runs, curves, a["noise_run"], window, steps)}


def summarise(runs: list[dict], curves: dict[str, dict[int, float]], noise_run: str | None, window: int,
              steps: int) -> dict:
    ref = runs[0]["name"]
    second_half = set(range(steps // 2 + 1, steps + 1))
    summary = {"reference": ref, "noise_run": noise_run, "smooth_window": window,
               "from_step": steps // 2 + 1, "runs": {}}
    for r in runs:
        row = summary["runs"][r["name"]] = {
            "final_smoothed_loss": curves[r["name"]][max(curves[r["name"]])] if r["name"] in curves else None,
            "final_step": max(curves[r["name"]]) if r["name"] in curves else None}
        if r["name"] == ref:
            row["verdict"] = "reference"
            continue
        if ref not in curves or r["name"] not in curves:
            row["verdict"] = f"no comparison ({ref if ref not in curves else r['name']}: no steps)"
            continue
        # the same steps for the run, the reference and the noise run, so the statistics compare like with like
        common = second_half & curves[ref].keys() & curves[r["name"]].keys()
        if noise_run in curves:
            common &= curves[noise_run].keys()
        if not common:
            row["verdict"] = "no comparison (no steps of the second half in common)"
            continue
        common = sorted(common)
        row.update(delta_stats(curves[ref], curves[r["name"]], common))
        if r["name"] == noise_run:
            row["verdict"] = "noise estimate"
        elif noise_run not in curves:
            row["verdict"] = "no noise estimate" + (f" ({noise_run}: not run)" if noise_run else " (no --noise-run)")
        else:
            noise = delta_stats(curves[ref], curves[noise_run], common)
            row["noise_mean_abs_delta"], row["noise_max_abs_delta"] = noise["mean_abs_delta"], noise["max_abs_delta"]
            row["ratio_to_noise"] = row["mean_abs_delta"] / noise["mean_abs_delta"] if noise["mean_abs_delta"] else None
            row["verdict"] = "within noise" if row["mean_abs_delta"] <= noise["mean_abs_delta"] else "outside noise"
        if r["state"] != "ok":
            row["verdict"] += f" ({r['state']}: {r['steps_done']}/{steps} steps)"
    return summary


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = report["summary"]
    window, ref = s["smooth_window"], s["reference"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 8.5), sharex=True, height_ratios=(3, 2))
    smoothed = {}
    lows, highs = [], []
    for i, r in enumerate(report["runs"]):
        if not r["step"]:
            continue
        color = "k" if r["name"] == ref else f"C{i}"
        smoothed[r["name"]] = dict(zip(r["step"], smooth(r["loss"], window)))
        label = r["name"] + (f" ({', '.join(r['overrides'])})" if r["overrides"] else "") + \
            ("" if r["state"] == "ok" else f" [{r['state']}]")
        top.plot(r["step"], r["loss"], color=color, alpha=0.2, lw=0.8)
        top.plot(r["step"], list(smoothed[r["name"]].values()), color=color, lw=2, label=label,
                 ls="--" if r["name"] == s["noise_run"] else "-", zorder=3 if r["name"] == ref else 2)
        later = r["loss"][len(r["loss"]) // 10:] or r["loss"]
        lows.append(min(later))
        highs.append(max(later))
    if lows:  # the first tenth (random-init loss ~ln(vocab)) would flatten everything else
        margin = 0.05 * (max(highs) - min(lows) or 1.0)
        top.set_ylim(min(lows) - margin, max(highs) + margin)
    a = report["args"]
    top.set_title(f"{a['shape']}, seq {a['seq']}, global batch {a['global_batch']}, lr {a['lr']:g} "
                  f"(warmup {a['warmup']}, cosine), {report['setup'].get('card', '')}: train loss "
                  f"(faint: per step, bold: mean of the last {window})", fontsize=10)
    top.set_ylabel("train loss")
    if smoothed:
        top.legend(fontsize=9)
    top.grid(alpha=0.3)
    compared = 0
    for i, r in enumerate(report["runs"]):
        if r["name"] == ref or r["name"] not in smoothed or ref not in smoothed:
            continue
        compared += 1
        steps = [x for x in r["step"] if x in smoothed[ref]]
        style = "--" if r["name"] == s["noise_run"] else "-"
        bottom.plot(steps, [smoothed[r["name"]][x] - smoothed[ref][x] for x in steps], style, color=f"C{i}", lw=1.5,
                    label=r["name"] + (" (noise: another seed)" if r["name"] == s["noise_run"] else ""))
    bottom.axhline(0, color="k", lw=0.8)  # the reference
    bottom.axvline(s["from_step"], color="gray", lw=0.8, ls=":")
    bottom.set_ylabel(f"smoothed loss − {ref}")
    bottom.set_xlabel(f"step (statistics from step {s['from_step']}, dotted)")
    if compared:
        bottom.legend(fontsize=9)
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.rename(path)


def report(out: Path, plan: dict) -> dict:
    """Write loss_curve.json and loss_curve.png (temp name, then rename); return the report."""
    result = collect(out, plan)
    tmp = out / "loss_curve.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    tmp.rename(out / "loss_curve.json")
    try:
        plot(result, out / "loss_curve.png")
    except ImportError:
        print("loss_curve.png: matplotlib is not installed; `loss_curve.py --report OUT` draws it elsewhere",
              flush=True)
    return result


def print_verdicts(result: dict) -> None:
    s, steps = result["summary"], result["args"]["steps"]
    print(f"\nsmoothed train loss (mean of the last {s['smooth_window']} steps); Δ against {s['reference']} over "
          f"steps {s['from_step']}–{steps}; noise = {s['noise_run'] or '(none)'}")
    print(f"{'run':14} {'state':10} {'steps':>7} {'tok/s/GPU':>10} {'final':>7} {'mean|Δ|':>8} {'max|Δ|':>8} "
          f"{'mean Δ':>8} {'×noise':>7}  verdict")
    for r in result["runs"]:
        row = s["runs"][r["name"]]

        def num(key, fmt, row=row):
            return "-" if row.get(key) is None else format(row[key], fmt)

        tps = f"{r['tokens_s_per_gpu']:,.0f}" if r["tokens_s_per_gpu"] else "-"
        print(f"{r['name']:14} {r['state']:10} {r['steps_done']:>7} {tps:>10} {num('final_smoothed_loss', '.4f'):>7} "
              f"{num('mean_abs_delta', DELTA):>8} {num('max_abs_delta', DELTA):>8} {num('mean_delta', '+' + DELTA):>8} "
              f"{num('ratio_to_noise', '.2f'):>7}  {row['verdict']}")
    for r in result["runs"]:
        row = s["runs"][r["name"]]
        if "noise_mean_abs_delta" in row:
            print(f"  {r['name']}: {row['verdict']} — mean |Δ| {row['mean_abs_delta']:{DELTA}} vs noise "
                  f"{row['noise_mean_abs_delta']:{DELTA}}; max |Δ| {row['max_abs_delta']:{DELTA}} vs noise "
                  f"{row['noise_max_abs_delta']:{DELTA}}; mean Δ {row['mean_delta']:+{DELTA}} (> 0: higher loss than "
                  f"{s['reference']})")


# --- driver ------------------------------------------------------------------------------------------------

def setup_info() -> dict:
    import torch

    card = "cpu"
    if shutil.which("nvidia-smi"):
        names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                               text=True, check=False).stdout.split("\n")
        card = names[0].strip() or card
    return {"card": card, "torch": torch.__version__, "python": sys.version.split()[0],
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", help="NAME[:key=value,...] each; the first is the reference")
    p.add_argument("--noise-run", help="the run that repeats the reference with another seed (the noise yardstick)")
    p.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--micro", type=int, default=2)
    p.add_argument("--global-batch", type=int, default=4, help="per step, all GPUs of a run")
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (cosine to --min-lr)")
    p.add_argument("--min-lr", type=float, default=3e-5)
    p.add_argument("--warmup", type=int, default=20, help="linear warmup steps")
    p.add_argument("--smooth", type=int, default=20, help="window (steps) of the smoothed loss")
    p.add_argument("--gpus-per-run", type=int, default=1, help="GPUs per run (torchrun when > 1)")
    p.add_argument("--gpus", type=int, help="use the first N visible GPUs (default: all)")
    p.add_argument("--data", default=str(ROOT / ".bench-gpu/data"),
                   help="directory with ja_sample/en_sample_text_document.bin/.idx (blend 0.9/0.1)")
    p.add_argument("--tokenizer", default=str(ROOT / "src/keizoku/assets/tokenizer"),
                   help="the Hugging Face tokenizer directory the data was tokenized with")
    p.add_argument("--progress-s", type=float, default=60, help="print each running run's step this often")
    p.add_argument("--out", default=os.environ.get("OUT"), help="output directory (default $OUT)")
    p.add_argument("--report", metavar="OUT", help="only redo loss_curve.json/png and the verdicts from OUT")
    a = p.parse_args()
    if a.report:
        out = Path(a.report)
        if not (out / "plan.json").is_file():
            raise BenchError(f"--report {out}: no plan.json (not a loss_curve.py output directory)")
        result = report(out, json.loads((out / "plan.json").read_text()))
        print_verdicts(result)
        return 0 if result["complete"] else 1
    if not a.runs or not a.out:
        raise BenchError("--runs and --out (or $OUT) are required")
    specs = [parse_run(r) for r in a.runs]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise BenchError(f"--runs: names must differ, got {names}")
    if a.noise_run is not None and a.noise_run not in names[1:]:
        raise BenchError(f"--noise-run {a.noise_run!r}: expected one of the runs after the reference {names[1:]}")
    out = Path(a.out).resolve()
    for name in names:
        if run_dir(out, name).exists():
            raise BenchError(f"--out {out}: runs/{name} exists already (metrics would be appended to); use a fresh "
                             "--out")
    check_inputs(a)
    groups = device_groups(a.gpus, a.gpus_per_run)
    plan = {"args": {k: v for k, v in vars(a).items() if k not in ("report", "out", "runs")},
            "runs": [asdict(s) for s in specs], "setup": setup_info()}
    plan["setup"]["concurrent_runs"] = len(groups) if groups != [None] else 1
    for s in specs:
        run_dir(out, s.name).mkdir(parents=True)
    (out / "plan.json").write_text(json.dumps(plan, indent=1))
    model_dir = Path(tempfile.mkdtemp(prefix="kz-loss-model-"))  # outside --out: the tokenizer can be 17 MB
    write_model_dir(model_dir, a.shape, a.seq, Path(a.tokenizer))
    print(f"{len(specs)} runs of {a.steps} steps, {plan['setup']['concurrent_runs']} at a time on "
          f"{plan['setup']['card']}; logs in {out}/runs/NAME/train.log", flush=True)

    free: queue.Queue = queue.Queue()
    for g in groups:
        free.put(g)
    lock = threading.Lock()

    def one(spec: RunSpec) -> int:
        devices = free.get()
        try:
            return launch(spec, devices, a, out, model_dir)
        finally:
            free.put(devices)
            with lock:  # after each run, so a call cut short still leaves a summary of what finished
                report(out, plan)

    t0 = time.perf_counter()
    next_progress = t0 + a.progress_s
    with ThreadPoolExecutor(len(groups)) as pool:
        futures = [pool.submit(one, s) for s in specs]
        while not all(f.done() for f in futures):
            time.sleep(1)
            if time.perf_counter() >= next_progress:
                next_progress += a.progress_s
                progress(out, specs, a.steps, t0)
        codes = [f.result() for f in futures]
    shutil.rmtree(model_dir, ignore_errors=True)
    with lock:
        result = report(out, plan)
    print_verdicts(result)
    failed = [s.name for s, c in zip(specs, codes) if c]
    if failed:
        print(f"\nfailed: {', '.join(failed)} (logs: {out}/runs/NAME/train.log)")
    return 1 if failed or not result["complete"] else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as e:
        print(f"loss_curve.py: {e}", file=sys.stderr)
        sys.exit(2)
