"""``keizoku export`` at a chosen model size: wall time, the export process's peak RSS, and what it wrote, for the
keizoku here and (``--baseline-src``) another keizoku's source tree, side by side on one checkpoint.

It builds, under ``--work``: a Llama-shaped base model (random weights in the base dtype, or only its config with
``--no-base-weights``), a run directory whose one checkpoint (``checkpoints/step_00000001``) holds those weights in
fp32 as engine torch saves them (DCP ``{"model": ..., "optim": {}}``, ``trainer_state.json``, the commit marker),
its ``config.yaml`` and its copy of the base model (``base-model/``); then runs ``python -m keizoku export`` as a
child process for each variant and polls its peak RSS (VmHWM). Each export is deleted once measured,
and ``--work`` at the end (``--keep`` keeps them). No network, nothing outside ``--work``.

    python bench/scale/export.py --shape 0.5b --work /tmp/bench-export --baseline-src /tmp/baseline/src

Disk: checkpoint 4 bytes a parameter, base model and export 2 (bf16) or 4 (fp32) each; memory of this script:
the model in fp32 while the checkpoint is written (8B: 32 GB). The old export needs the base model's weights.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHAPES, llama_config  # noqa: E402

STEP = 1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=SHAPES, default="0.5b")
    p.add_argument("--work", type=Path, required=True, help="Directory for the model, run and exports (made anew).")
    p.add_argument("--base-dtype", choices=["bf16", "fp32"], default="bf16", help="The base model's dtype.")
    p.add_argument("--baseline-src", type=Path, help="Another keizoku's src/ (e.g. the previous commit's): its "
                                                     "export is measured too, first.")
    p.add_argument("--no-base-weights", action="store_true", help="Write only the base model's config and "
                                                                   "tokenizer (the old export cannot run then).")
    p.add_argument("--variant", action="append", dest="variants", metavar="FLAGS",
                   help="Flags for one `keizoku export` of this tree (repeat; write --variant='--dtype fp32', and "
                        "--variant= for none). Default: none, --no-verify-logits, --dtype fp32.")
    p.add_argument("--json", type=Path, help="Also write the results here.")
    p.add_argument("--keep", action="store_true", help="Keep --work.")
    args = p.parse_args()

    if args.work.exists():
        shutil.rmtree(args.work)
    args.work.mkdir(parents=True)
    try:
        run = make_run(args.work, args.shape, torch.bfloat16 if args.base_dtype == "bf16" else torch.float32,
                       base_weights=not args.no_base_weights)
        variants = [("new", v) for v in args.variants or ["", "--no-verify-logits", "--dtype fp32"]]
        if args.baseline_src:
            variants.insert(0, ("old", ""))
        results = [measure(run, args.work / f"export-{i}", who, flags, args.baseline_src, keep=args.keep)
                   for i, (who, flags) in enumerate(variants)]
        report = {"shape": args.shape, "parameters": parameter_count(run), "machine": machine(),
                  "checkpoint_bytes": tree_bytes(run / "checkpoints"), "results": results}
        print(table(report))
        if args.json:
            args.json.write_text(json.dumps(report, indent=1) + "\n")
    finally:
        if not args.keep:
            shutil.rmtree(args.work, ignore_errors=True)


def make_run(work: Path, shape: str, base_dtype: torch.dtype, base_weights: bool) -> Path:
    """The base model (``work/base``) and a run (``work/run``) with one engine-torch checkpoint of its weights."""
    import torch.distributed.checkpoint as dcp
    from transformers import AutoModelForCausalLM

    import keizoku
    from keizoku import base_model, rundir
    from keizoku.config import load_config, save_resolved
    from keizoku.engines.torch.checkpoint import TRAINER_STATE
    from keizoku.hf import dtype_kwargs, set_config_dtype

    tokenizer = Path(keizoku.__file__).parent / "assets" / "tokenizer"
    base, run = work / "base", work / "run"
    config = llama_config(shape, 4096)
    start = time.perf_counter()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, **dtype_kwargs(torch.float32))  # fp32, as training keeps it
    model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(1.0 if name.endswith("norm.weight") else 0.0, 0.02, generator=generator)
    final = rundir.checkpoint_path(run, STEP)
    staged = rundir.staging_path(final, tag="")
    dcp.save({"model": model.state_dict(), "optim": {}}, checkpoint_id=str(staged), no_dist=True)
    (staged / TRAINER_STATE).write_text(json.dumps({"step": STEP, "consumed_samples": 8, "consumed_tokens": 8192}))
    rundir.commit_checkpoint(staged, final, STEP)
    if base_weights:  # the checkpoint keeps fp32 values that the base dtype cannot hold, as a trained one does
        model.to(base_dtype).save_pretrained(base)
    else:
        base.mkdir(parents=True)
        set_config_dtype(config, base_dtype)  # what --dtype auto follows, as a hub model's config.json says
        config.save_pretrained(base)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer / name, base / name)
    cfg = load_config(None, [f"run_dir={run}", f"model.hf_path={base}", "data.mock=true", f"train.max_steps={STEP}"])
    save_resolved(cfg, run)
    base_model.snapshot(cfg)
    print(f"made the base model and checkpoint ({model.num_parameters() / 1e9:.2f}B parameters) in "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    return run


def measure(run: Path, out: Path, who: str, flags: str, baseline_src: Path | None, keep: bool) -> dict:
    """One ``keizoku export`` in a child process: its wall time, peak RSS and output."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if who == "old":
        env["PYTHONPATH"] = os.pathsep.join([str(baseline_src.absolute()), env.get("PYTHONPATH", "")])
    command = [sys.executable, "-m", "keizoku", "export", str(run), "--out", str(out), *flags.split()]
    start = time.perf_counter()
    child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = PeakRss(child.pid)
    output = child.stdout.read()
    child.wait()
    seconds = time.perf_counter() - start
    if child.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({child.returncode}):\n{output}")
    record = json.loads((out / "keizoku_export.json").read_text())
    result = {"who": who, "flags": flags or "(default)", "seconds": round(seconds, 1),
              "peak_rss_gib": round(peak.stop() / 2**30, 2),
              "output_bytes": tree_bytes(out), "dtype": record.get("dtype", "float32 (save_pretrained)"),
              "logits_checked": who == "old" or "max_logit_diff" in record,  # the old export always did
              "log": output.strip().splitlines()[-6:]}
    print(json.dumps({k: v for k, v in result.items() if k != "log"}), flush=True)
    if not keep:
        shutil.rmtree(out)
    return result


class PeakRss:
    """A process's peak resident memory, polled from its ``/proc/PID/status`` VmHWM (the high-water mark of the
    program it runs, which starts anew at exec). Not ``getrusage``/``wait4``'s ru_maxrss: Linux carries into it the
    RSS the child had as a fork of this process before exec, i.e. this script's own (the model it built)."""

    def __init__(self, pid: int, every: float = 0.02):
        self.pid, self.every, self.peak = pid, every, 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._done.is_set():
            try:
                status = Path(f"/proc/{self.pid}/status").read_text()
            except OSError:  # exited
                return
            hwm = next((line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")), None)
            if hwm is not None:  # a zombie has none
                self.peak = max(self.peak, int(hwm) * 1024)
            time.sleep(self.every)

    def stop(self) -> int:
        """The peak in bytes (call once the process has ended)."""
        self._done.set()
        self._thread.join()
        return self.peak


def parameter_count(run: Path) -> int:
    from torch.distributed.checkpoint import FileSystemReader

    stored = FileSystemReader(str(run / f"checkpoints/step_{STEP:08d}")).read_metadata().state_dict_metadata
    return sum(torch.Size(m.size).numel() for k, m in stored.items() if k.startswith("model."))


def tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def machine() -> str:
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return f"{cpu}, {os.cpu_count()} cores, {memory:.0f} GiB; torch {torch.__version__}"


def table(report: dict) -> str:
    lines = [f"{report['shape']} ({report['parameters'] / 1e9:.2f}B parameters; checkpoint "
             f"{report['checkpoint_bytes'] / 1e9:.2f} GB) on {report['machine']}", "",
             "| export | flags | wall s | peak RSS GiB | output GB | dtype | logits checked |",
             "|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        lines.append(f"| {r['who']} | {r['flags']} | {r['seconds']} | {r['peak_rss_gib']} | "
                     f"{r['output_bytes'] / 1e9:.2f} | {r['dtype']} | {'yes' if r['logits_checked'] else 'no'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
