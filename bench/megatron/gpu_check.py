"""engine: megatron end to end on one GPU, through keizoku's CLI only (run by gpu_check.sh; see README.md).

1. a tiny Llama-shaped HF model (fp32) → ``keizoku convert import`` into the import cache → the Megatron
   model's logits against HF's;
2. run A: ``keizoku train`` engine megatron, 30 steps from those weights on keizoku-tokenized data (the import
   is found in the cache, not redone); loss must fall;
3. run B: the same config stopped at step 15 (``train.exit_interval``, exit status 3), then rerun: it resumes
   and must end where A ends (losses of steps 16–30, final weights);
4. ``keizoku export`` of A and B (keizoku verifies the export's logits against the Megatron model on the GPU);
5. run T: the same config with engine: torch (same data order, same initial weights) — loss curves compared.

Writes ``$OUT/results.json`` (updated after each stage, so a run cut short still reports) and logs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / ".gpu" / "data"
WORK = Path(os.environ.get("KZ_WORK", "/tmp/kzm"))
OUT = Path(os.environ.get("OUT", WORK / "out"))
STEPS, STOP_AT = 30, 15
RESULTS: dict = {}


def save() -> None:
    (OUT / "results.json").write_text(json.dumps(RESULTS, indent=1, default=str) + "\n")


def keizoku(*args, log: str, expect: int = 0, timeout: int = 400) -> float:
    """Run the real CLI; its output goes to $OUT/<log>.log. Returns seconds."""
    start = time.perf_counter()
    with open(OUT / f"{log}.log", "w") as f:
        proc = subprocess.run([sys.executable, "-m", "keizoku", *map(str, args)], stdout=f, stderr=subprocess.STDOUT,
                              timeout=timeout)
    seconds = time.perf_counter() - start
    if proc.returncode != expect:
        tail = (OUT / f"{log}.log").read_text()[-4000:]
        raise SystemExit(f"keizoku {' '.join(map(str, args))}: exit {proc.returncode}, expected {expect}\n{tail}")
    return seconds


def make_model(path: Path) -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=8002, hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=8000, eos_token_id=8001,
        tie_word_embeddings=False), dtype=torch.float32)
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(REPO / "src/keizoku/assets/tokenizer" / name, path / name)


def config(run: str, engine: str = "megatron", dtype: str = "fp32", steps: int = STEPS, warmup: int = 0,
           sets: tuple[str, ...] = ("ja",), at_start: bool = False, mg: dict | None = None,
           **megatron_overrides) -> Path:
    import yaml

    cfg = {
        "engine": engine, "run_dir": str(WORK / run),
        "model": {"hf_path": str(WORK / "hf"), "dtype": dtype},
        "data": {"blend": [{"path": str(DATA / "ja_sample_text_document"), "weight": 0.9},
                           {"path": str(DATA / "en_sample_text_document"), "weight": 0.1}],
                 "validation": {name: [{"path": str(DATA / f"{name}_sample_text_document")}] for name in sets},
                 "seq_length": 128, "num_workers": 0, "seed": 1234},
        "train": {"global_batch_size": 8, "micro_batch_size": 2, "max_steps": steps, "seed": 1234},
        "optim": {"lr": 3e-3, "min_lr": 3e-4},
        "schedule": {"kind": "cosine", "warmup_steps": warmup},
        "checkpoint": {"interval": 10, "keep_last": 3},
        "eval": {"interval": 10, "batches": 4, "at_start": at_start},
        "logging": {"interval": 1, "tensorboard": engine == "megatron"},
        # no Transformer Engine on this machine: Megatron-Core's own layers; without TE or Apex the distributed
        # optimizer cannot resume (bench/megatron/README.md), so it is off here
        "megatron": {"transformer_impl": "local", "distributed_optimizer": False, "overlap_param_gather": False,
                     "import_dir": str(WORK / "imports"),
                     "overrides": {f"train.{k}": v for k, v in megatron_overrides.items()}, **(mg or {})},
    }
    path = WORK / f"{run}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def tb_losses(run: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(WORK / run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = acc.Tags()["scalars"]
    RESULTS.setdefault("tensorboard_tags", tags)
    return {e.step: e.value for e in acc.Scalars("lm loss")}


def tb_scalar(run: str, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(WORK / run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)} if tag in acc.Tags()["scalars"] else {}


def import_logits(import_dir: Path) -> dict:
    """The imported checkpoint's Megatron model vs the HF model, on the GPU, fp32."""
    from megatron.bridge.training.model_load_save import build_and_load_model, temporary_distributed_context
    from transformers import AutoModelForCausalLM

    from keizoku.engines.megatron.container import apply_to_provider, hf_bridge
    from keizoku.engines.megatron.export import logits_difference
    from keizoku.engines.megatron.plan import impl_settings

    with temporary_distributed_context(backend="gloo"):
        provider = hf_bridge(str(WORK / "hf"), False).to_megatron_provider(load_weights=False)
        apply_to_provider(provider, {**impl_settings("local"), "bf16": False, "params_dtype": torch.float32,
                                     "perform_initialization": False})
        model = build_and_load_model(str(import_dir / "iter_0000000"), provider, use_cpu_init=True,
                                     skip_temp_dist_context=True)
        model = model if isinstance(model, list) else [model]
        hf = AutoModelForCausalLM.from_pretrained(WORK / "hf", dtype=torch.float32)
        diff, scale = logits_difference(model[0], hf)
    return {"max_logit_diff": diff, "logit_scale": scale}


def safetensors_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    ta, tb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert ta.keys() == tb.keys(), (sorted(ta)[:5], sorted(tb)[:5])
    return max((ta[k].float() - tb[k].float()).abs().max().item() for k in ta)


def extra() -> None:
    """bf16 mixed precision (the default) with warmup, and a walltime signal (SIGUSR1) stopping and resuming."""
    import signal

    from keizoku.engines.megatron import versions

    RESULTS["megatron"] = str(versions.detect())
    # bf16: loss falls from the import; the export is verified at bf16 tolerance
    RESULTS["bf16_seconds"] = round(keizoku("train", config("H", dtype="auto", warmup=5), log="train_H"), 1)
    h = tb_losses("H")
    RESULTS["bf16_loss"] = h
    keizoku("export", WORK / "H", "--out", WORK / "H-hf", log="export_H")
    RESULTS["bf16_export_log"] = [ln for ln in (OUT / "export_H.log").read_text().splitlines() if "verified" in ln]
    save()
    # SIGUSR1 (PBS/Slurm walltime warnings) while training: save, exit 3; the rerun finishes the run
    steps = 200
    log = OUT / "train_S1.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "keizoku", "train", str(config("S", steps=steps))],
                                stdout=f, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while "iteration       20/" not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        proc.send_signal(signal.SIGUSR1)
        status = proc.wait(timeout=300)
    stopped = int((WORK / "S/checkpoints/latest_checkpointed_iteration.txt").read_text())
    RESULTS["signal"] = {"exit_status": status, "saved_at": stopped}
    save()
    keizoku("train", config("S", steps=steps), log="train_S2", timeout=400)
    done = int((WORK / "S/checkpoints/latest_checkpointed_iteration.txt").read_text())
    RESULTS["signal"].update(resumed_to=done, resumed_log=[ln for ln in (OUT / "train_S2.log").read_text()
                                                          .splitlines() if "loading" in ln.lower()][:3])
    save()
    print(json.dumps({k: v for k, v in RESULTS.items() if not k.endswith("_loss")}, indent=1, default=str))
    print("bf16 loss:", {k: round(v, 4) for k, v in h.items() if k in (1, 5, 10, 20, 30)})


def metrics(run: str) -> tuple[dict[int, dict], dict[int, dict]]:
    """RUN_DIR/metrics.jsonl: ({step: train record}, {step: eval record}); a resumed run's later records win."""
    train, evals = {}, {}
    for r in map(json.loads, (WORK / run / "metrics.jsonl").read_text().splitlines()):
        (train if r["kind"] == "train" else evals)[r["step"]] = r
    return train, evals


def background(args: list, log: str, gpus: str) -> subprocess.Popen:
    f = open(OUT / f"{log}.log", "w")
    return subprocess.Popen([sys.executable, "-m", "keizoku", *map(str, args)], stdout=f, stderr=subprocess.STDOUT,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": gpus})


def torchrun(*args, log: str, nproc: int = 2, timeout: int = 300) -> tuple[int, float]:
    start = time.perf_counter()
    with open(OUT / f"{log}.log", "w") as f:
        try:
            proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                                   str(nproc), "-m", "keizoku", *map(str, args)], stdout=f, stderr=subprocess.STDOUT,
                                  timeout=timeout)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = -999
    return code, round(time.perf_counter() - start, 1)


def walltime_signal(run: str, steps: int, at: int, gpus: str) -> dict:
    """SIGUSR1 to `keizoku train` once step `at` is logged: it must save, exit 3, and a rerun must finish."""
    import re
    import signal

    log = OUT / f"train_{run}1.log"
    proc = background(["train", config(run, steps=steps)], f"train_{run}1", gpus)
    deadline, seen = time.monotonic() + 240, None
    pattern = re.compile(rf"iteration\s+{at}/")
    while proc.poll() is None and time.monotonic() < deadline:
        if pattern.search(log.read_text(errors="replace")):
            seen = time.monotonic()
            break
        time.sleep(0.2)
    out = {"line_seen": seen is not None, "alive_when_signalled": proc.poll() is None}
    proc.send_signal(signal.SIGUSR1)
    out["exit_status"] = proc.wait(timeout=240)
    text = log.read_text(errors="replace")
    out["keizoku_said"] = [ln for ln in text.splitlines() if "SIGUSR1" in ln or "stopped at step" in ln][:4]
    tracker = WORK / run / "checkpoints/latest_checkpointed_iteration.txt"
    out["saved_at"] = int(tracker.read_text()) if tracker.exists() else None
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": gpus}
    with open(OUT / f"train_{run}2.log", "w") as f:
        out["rerun_exit_status"] = subprocess.run([sys.executable, "-m", "keizoku", "train", str(config(run, steps=steps))],
                                                  stdout=f, stderr=subprocess.STDOUT, env=env, timeout=300).returncode
    out["finished_at"] = int(tracker.read_text()) if tracker.exists() else None
    return out


def parallel() -> None:
    """Two GPUs: TP=2, PP=2, DP=2 with the distributed optimizer, each against the one-GPU
    curve; exports from the TP=2 and PP=2 checkpoints; metrics.jsonl with two validation sets and eval at step 0
    against engine: torch; SIGUSR1 stopping a run."""
    from keizoku.engines.megatron import versions
    from keizoku.engines.megatron.importer import cache_dir, fingerprint

    found = versions.detect()
    RESULTS["megatron"] = str(found)
    RESULTS["gpus"] = torch.cuda.device_count()
    sets = ("ja", "en")
    # the import once, into the cache every run finds
    target = cache_dir(WORK / "imports", fingerprint(WORK / "hf"), found.release)
    RESULTS["import_seconds"] = round(keizoku("convert", "import", "--engine", "megatron", WORK / "hf", "--out",
                                              target, "--transformer-impl", "local", log="import"), 1)
    save()
    # GPU 0: one-GPU megatron (two validation sets, eval at step 0); GPU 1: the same with engine: torch
    t0 = time.perf_counter()
    one = background(["train", config("P1", sets=sets, at_start=True)], "train_P1", "0")
    tor = background(["train", config("T", engine="torch", sets=sets, at_start=True)], "train_T", "1")
    RESULTS["P1_exit"], RESULTS["T_exit"] = one.wait(timeout=300), tor.wait(timeout=300)
    RESULTS["P1_T_seconds"] = round(time.perf_counter() - t0, 1)
    p1_train, p1_eval = metrics("P1")
    t_train, t_eval = metrics("T")
    RESULTS["P1_loss"] = {s: r["loss"] for s, r in p1_train.items()}
    RESULTS["P1_eval"] = p1_eval
    RESULTS["T_eval"] = t_eval
    RESULTS["P1_record_keys"] = sorted(p1_train[STEPS])
    RESULTS["torch_vs_megatron_max_loss_diff"] = max(abs(p1_train[s]["loss"] - t_train[s]["loss"])
                                                     for s in range(1, STEPS + 1))
    RESULTS["torch_vs_megatron_eval_diff"] = {
        step: {k: abs(v - t_eval[step][k]) for k, v in rec.items() if k.endswith("_loss")}
        for step, rec in p1_eval.items() if step in t_eval}
    save()
    print("P1 vs T:", RESULTS["torch_vs_megatron_max_loss_diff"], RESULTS["torch_vs_megatron_eval_diff"], flush=True)

    # SIGUSR1 on GPU 0 while GPU 1 is free for nothing else: keep it short
    RESULTS["signal"] = walltime_signal("S", steps=60, at=8, gpus="0")
    save()
    print("signal:", RESULTS["signal"], flush=True)

    # sequence parallelism with the local layer spec needs Apex's FusedLayerNorm (keizoku refuses it without):
    # with neither TE nor Apex here, tensor parallelism alone
    layouts = {"TP2": {"tensor_parallel": 2},
               "PP2": {"pipeline_parallel": 2},
               "DP2DO": {"distributed_optimizer": True, "overlap_grad_reduce": True, "overlap_param_gather": True}}
    base = RESULTS["P1_loss"]
    for name, mg in layouts.items():
        code, seconds = torchrun("train", config(name, sets=sets, at_start=True, mg=mg), log=f"train_{name}")
        entry = {"exit": code, "seconds": seconds, "megatron": mg}
        try:
            tr, ev = metrics(name)
            entry["loss"] = {s: r["loss"] for s, r in tr.items()}
            entry["max_loss_diff_vs_1gpu"] = max(abs(tr[s]["loss"] - base[s]) for s in range(1, STEPS + 1))
            entry["eval"] = ev
            entry["max_eval_diff_vs_1gpu"] = max(abs(v - p1_eval[st][k]) for st, rec in ev.items()
                                                 for k, v in rec.items() if k.endswith("_loss"))
        except (OSError, KeyError, ValueError) as e:
            entry["error"] = repr(e)
            entry["log_tail"] = (OUT / f"train_{name}.log").read_text(errors="replace")[-3000:]
        RESULTS[name] = entry
        save()
        print(name, {k: v for k, v in entry.items() if k not in ("loss", "eval", "log_tail")}, flush=True)

    # exports from the TP=2 and PP=2 checkpoints (one GPU each), checked by keizoku against the Megatron logits
    procs = {}
    for gpu, name in enumerate(("TP2", "PP2")):
        if (WORK / name / "checkpoints/latest_checkpointed_iteration.txt").exists():
            procs[name] = background(["export", WORK / name, "--out", WORK / f"{name}-hf"], f"export_{name}", str(gpu))
    p1_export = background(["export", WORK / "P1", "--out", WORK / "P1-hf"], "export_P1", "0") if not procs else None
    for name, proc in procs.items():
        entry = RESULTS[name]
        entry["export_exit"] = proc.wait(timeout=300)
        entry["export_log"] = [ln for ln in (OUT / f"export_{name}.log").read_text().splitlines() if "verified" in ln]
    if p1_export is None:
        keizoku("export", WORK / "P1", "--out", WORK / "P1-hf", log="export_P1")
    else:
        p1_export.wait(timeout=300)
    for name in procs:
        if (WORK / f"{name}-hf/model.safetensors").exists():
            RESULTS[name]["export_max_weight_diff_vs_1gpu"] = safetensors_diff(WORK / "P1-hf", WORK / f"{name}-hf")
    save()
    print(json.dumps({k: v for k, v in RESULTS.items() if not k.endswith(("_loss", "_eval"))}, indent=1,
                     default=lambda o: str(o))[:6000])


def prepare() -> None:
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    OUT.mkdir(parents=True, exist_ok=True)
    RESULTS["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    RESULTS["torch"] = torch.__version__
    make_model(WORK / "hf")


def main() -> None:
    prepare()
    from keizoku.engines.megatron import versions
    from keizoku.engines.megatron.importer import cache_dir, fingerprint

    found = versions.detect()
    RESULTS["megatron"] = str(found)

    # 1. import (into the cache path a run looks for), then the imported model's logits against HF
    target = cache_dir(WORK / "imports", fingerprint(WORK / "hf"), found.release)
    seconds = keizoku("convert", "import", "--engine", "megatron", WORK / "hf", "--out", target,
                      "--transformer-impl", "local", log="import")
    RESULTS["import"] = {"seconds": round(seconds, 1), "dir": str(target), **import_logits(target)}
    save()
    print("import:", RESULTS["import"], flush=True)

    # 2. run A, uninterrupted
    RESULTS["A_seconds"] = round(keizoku("train", config("A"), log="train_A"), 1)
    a = tb_losses("A")
    RESULTS["A_loss"] = a
    RESULTS["A_valid"] = tb_scalar("A", "lm loss validation")
    RESULTS["A_reimported"] = "importing" in (OUT / "train_A.log").read_text()
    save()
    print(f"A: loss {a.get(1)} -> {a.get(STEPS)}", flush=True)

    # 3. run B: stop at STOP_AT (exit 3: saved, resubmit), then resume
    keizoku("train", config("B", exit_interval=STOP_AT), log="train_B1", expect=3)
    RESULTS["B_stopped_at"] = (WORK / "B/checkpoints/latest_checkpointed_iteration.txt").read_text().strip()
    keizoku("train", config("B"), log="train_B2")
    b = tb_losses("B")
    RESULTS["B_loss"] = b
    RESULTS["resume_max_loss_diff"] = max(abs(a[s] - b[s]) for s in range(STOP_AT + 1, STEPS + 1))
    save()

    # 4. exports (keizoku verifies each against the Megatron model's logits on this GPU)
    keizoku("export", WORK / "A", "--out", WORK / "A-hf", log="export_A")
    keizoku("export", WORK / "B", "--out", WORK / "B-hf", log="export_B")
    RESULTS["export_A"] = json.loads((WORK / "A-hf/keizoku_export.json").read_text())
    RESULTS["export_A_log"] = [ln for ln in (OUT / "export_A.log").read_text().splitlines() if "verified" in ln]
    RESULTS["resume_max_weight_diff"] = safetensors_diff(WORK / "A-hf", WORK / "B-hf")
    save()

    # 5. the same run with engine: torch
    RESULTS["T_seconds"] = round(keizoku("train", config("T", engine="torch"), log="train_T"), 1)
    t = {r["step"]: r["loss"] for r in map(json.loads, (WORK / "T/metrics.jsonl").read_text().splitlines())
         if r["kind"] == "train"}
    RESULTS["T_loss"] = t
    diffs = {s: abs(a[s] - t[s]) for s in range(1, STEPS + 1)}
    RESULTS["torch_vs_megatron_max_loss_diff"] = max(diffs.values())
    RESULTS["torch_vs_megatron_first_step_diff"] = diffs[1]
    save()

    print("\nstep  megatron A  megatron B  torch T")
    for s in range(1, STEPS + 1):
        print(f"{s:4d}  {a[s]:10.5f}  {b.get(s, float('nan')):10.5f}  {t[s]:8.5f}")
    print(json.dumps({k: v for k, v in RESULTS.items() if not k.endswith("_loss")}, indent=1, default=str))


def phases() -> None:
    """Phases with engine megatron, one `keizoku train`: main (ja/en blend, warmup 3, constant, 10 steps) then anneal
    (ja alone, linear to min_lr, 10 steps) as its own Bridge run (the process execs into it); the end of main kept in
    RUN_DIR/phase-ends and exported from there after Bridge pruned its own copy; the logged LR of every step
    against keizoku's plan; the same config with engine torch (the same samples), losses side by side."""
    import yaml

    prepare()
    from keizoku.config import load_config
    from keizoku.engines.megatron import versions
    from keizoku.schedule import run_plan

    RESULTS["megatron"] = str(versions.detect())

    def phased(run: str, engine: str) -> Path:
        path = config(run, engine=engine)
        cfg = yaml.safe_load(path.read_text())
        del cfg["train"]["max_steps"], cfg["schedule"]
        cfg["checkpoint"] = {"interval": 5, "keep_last": 1}
        cfg["eval"]["interval"] = 0
        cfg["phases"] = [{"name": "main", "max_steps": 10, "warmup_steps": 3},
                         {"name": "anneal", "max_steps": 10, "decay": "linear",
                          "blend": [{"path": str(DATA / "ja_sample_text_document")}]}]
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return path

    RESULTS["P_seconds"] = round(keizoku("train", phased("P", "megatron"), log="train_P", timeout=600), 1)
    log = (OUT / "train_P.log").read_text()
    RESULTS["P_exec_into_anneal"] = "starting phase anneal as its own Megatron-Bridge run" in log
    train, evals = metrics("P")
    plan = run_plan(load_config(WORK / "P/config.yaml"))
    RESULTS["P_phases"] = {s: train[s].get("phase") for s in sorted(train)}
    RESULTS["P_lr"] = {s: (train[s]["lr"], plan.lr_at(s - 1)) for s in sorted(train)}
    RESULTS["P_lr_max_rel_diff"] = max(abs(a - b) / b for a, b in RESULTS["P_lr"].values())
    RESULTS["P_evals"] = {s: (e.get("phase"), e.get("ja_loss")) for s, e in sorted(evals.items())}
    RESULTS["P_checkpoints"] = sorted(p.name for p in (WORK / "P/checkpoints").iterdir())
    RESULTS["P_phase_ends"] = sorted(p.name for p in (WORK / "P/phase-ends").iterdir()) \
        if (WORK / "P/phase-ends").is_dir() else []
    save()
    keizoku("export", WORK / "P", "--out", WORK / "P-main-hf", "--step", "10", log="export_P_main")
    RESULTS["P_export_main"] = json.loads((WORK / "P-main-hf/keizoku_export.json").read_text())
    save()
    RESULTS["Q_seconds"] = round(keizoku("train", phased("Q", "torch"), log="train_Q", timeout=600), 1)
    q, _ = metrics("Q")
    RESULTS["P_vs_torch_loss"] = {s: (round(train[s]["loss"], 5), round(q[s]["loss"], 5)) for s in sorted(train)}
    RESULTS["P_vs_torch_max_loss_diff"] = max(abs(train[s]["loss"] - q[s]["loss"]) for s in train)
    save()
    print(json.dumps(RESULTS, indent=1, default=str))


if __name__ == "__main__":
    if sys.argv[1:] == ["--phases"]:
        phases()
    elif sys.argv[1:] == ["--extra"]:
        prepare()
        extra()
    elif sys.argv[1:] == ["--parallel"]:
        prepare()
        parallel()
    else:
        main()
