"""Benchmark ``keizoku tokenize`` against Megatron-LM's ``tools/preprocess_data.py`` and raw HF ``encode_batch``.

What it does:

1. Builds a Japanese corpus of at least ``--size-mb`` MB (1 MB = 1e6 bytes of JSONL) from
   ``SHARED/data/ja_sample.jsonl.gz``: all paragraphs of the sample are pooled, and new documents of 1-8
   randomly chosen paragraphs in random order are drawn with a fixed seed (no line repeats), written as
   ``{"text": ...}`` lines. The corpus is cached in the work directory.
2. Clones Megatron-LM at ``--tag`` (default core_v0.16.1) into the work directory; it runs with
   ``PYTHONPATH=<clone>`` so its own ``megatron`` package is used (its code is never copied into this repo).
3. For each repeat, for each worker count, runs interleaved, each as a subprocess on the same input with
   the same tokenizer:
   ``keizoku tokenize --workers N``, ``preprocess_data.py --append-eod --workers N`` and ``raw_hf.py``
   (tokenizers' ``encode_batch`` with RAYON_NUM_THREADS=N, the Hugging Face ceiling).
4. Measures per run: wall seconds (whole program, startup included), CPU seconds (user + sys of the
   process and all its reaped descendants, from ``os.wait4``), peak RSS of the process tree (sum over the
   tree, sampled from /proc every ``--mem-interval`` seconds, and never below the largest process's peak)
   and the largest single process's max RSS (``ru_maxrss``, what ``/usr/bin/time``'s %M reports).
5. Checks that keizoku's and Megatron's .bin/.idx are byte-identical for every pair of runs; exits 1
   otherwise.
6. Prints a markdown report (machine, corpus, medians per tool and worker count, keizoku / Megatron speed
   ratios against the 6x target); ``--json`` writes every raw measurement too.

Run from the repository root with the project's venv:

    .venv/bin/python bench/tokenize/bench.py --megatron-repo /path/to/Megatron-LM
"""

from __future__ import annotations

import argparse
import filecmp
import gzip
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from keizoku.data import indexed

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
RAW_HF = HERE / "raw_hf.py"
TOOLS = ("keizoku", "megatron", "raw_hf")
TOOL_LABELS = {
    "keizoku": "keizoku tokenize",
    "megatron": "Megatron preprocess_data.py",
    "raw_hf": "raw HF encode_batch (whole program)",
    "raw_hf_encode": "raw HF encode_batch (encode phase only)",
}
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
MB = 1e6
MIB = 1024 * 1024


# --------------------------------------------------------------------------- arguments


def default_workers() -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return "1" if cores == 1 else f"1,{cores}"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shared", type=Path, default=REPO_ROOT.parent / "shared",
                   help="The shared data directory (default: ../shared next to the repository).")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="Hugging Face tokenizer directory (default: SHARED/tokenizers/llama3.1).")
    p.add_argument("--size-mb", type=float, default=100.0, help="Corpus size in MB of JSONL (1 MB = 1e6 bytes).")
    p.add_argument("--seed", type=int, default=0, help="Seed of the corpus builder.")
    p.add_argument("--repeats", type=int, default=3, help="Runs per tool and worker count.")
    p.add_argument("--workers", default=default_workers(),
                   help="Comma-separated worker counts (default: 1 and all cores: %(default)s).")
    p.add_argument("--workdir", type=Path, default=None,
                   help="Where the corpus, the Megatron clone, outputs and logs go (default: a temporary "
                   "directory, removed at the end). Give one to keep the corpus and clone cached.")
    p.add_argument("--megatron-repo", default="https://github.com/NVIDIA/Megatron-LM",
                   help="Megatron-LM git URL or local repository to clone from.")
    p.add_argument("--tag", default="core_v0.16.1", help="Megatron-LM tag to check out.")
    p.add_argument("--skip-megatron", action="store_true", help="Only run keizoku and raw HF (quick checks).")
    p.add_argument("--batch-size", type=int, default=1000, help="Documents per encode_batch call in raw_hf.py.")
    p.add_argument("--mem-interval", type=float, default=0.2, help="Seconds between RSS samples.")
    p.add_argument("--keep-outputs", action="store_true", help="Keep every run's .bin/.idx in the work directory.")
    p.add_argument("--json", type=Path, default=None, help="Write all raw results to this JSON file.")
    args = p.parse_args()
    args.tokenizer = args.tokenizer or args.shared / "tokenizers" / "llama3.1"
    args.workers = sorted({int(w) for w in args.workers.split(",")})
    if args.repeats < 1 or min(args.workers) < 1:
        p.error("--repeats and --workers must be >= 1")
    return args


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- machine


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def mem_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024 / 1024
    except OSError:
        pass
    return None


def version_of(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_info() -> dict:
    return {
        "nproc": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu": cpu_model(),
        "memory_gib": mem_total_gib(),
        "load_average": os.getloadavg(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "versions": {d: version_of(d) for d in
                     ("keizoku", "torch", "transformers", "tokenizers", "tiktoken", "numpy", "megatron-core")},
    }


# --------------------------------------------------------------------------- corpus


def load_paragraphs(sample_gz: Path) -> list[str]:
    """All non-empty paragraphs ("\\n\\n"-separated) of the sample's documents, in file order."""
    paragraphs = []
    with gzip.open(sample_gz, "rt", encoding="utf-8") as f:
        for line in f:
            paragraphs += [p for p in json.loads(line)["text"].split("\n\n") if p.strip()]
    return paragraphs


def build_corpus(sample_gz: Path, path: Path, size_mb: float, seed: int) -> None:
    """Write documents of 1-8 random distinct paragraphs, in random order, until the file has >= size_mb MB.

    A document that was already drawn is drawn again, so no two lines are equal.
    """
    paragraphs = load_paragraphs(sample_gz)
    rng = random.Random(seed)
    seen: set[bytes] = set()
    target = size_mb * MB
    written = 0
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        while written < target:
            k = rng.randint(1, min(8, len(paragraphs)))
            text = "\n\n".join(rng.sample(paragraphs, k))
            line = (json.dumps({"text": text}, ensure_ascii=False) + "\n").encode("utf-8")
            digest = hashlib.blake2b(line, digest_size=16).digest()
            if digest in seen:
                continue
            seen.add(digest)
            f.write(line)
            written += len(line)
    tmp.rename(path)


def corpus_stats(path: Path) -> dict:
    with open(path, "rb") as f:
        docs = sum(1 for _ in f)
    return {"path": str(path), "bytes": path.stat().st_size, "docs": docs}


def ensure_corpus(args: argparse.Namespace, workdir: Path) -> dict:
    path = workdir / f"ja_corpus_{args.size_mb:g}MB_seed{args.seed}.jsonl"
    if path.exists():
        log(f"corpus: reusing {path}")
    else:
        log(f"corpus: building {path} ...")
        build_corpus(args.shared / "data" / "ja_sample.jsonl.gz", path, args.size_mb, args.seed)
    return corpus_stats(path)


# --------------------------------------------------------------------------- Megatron-LM


def git(*cmd: str) -> str:
    return subprocess.run(["git", *cmd], check=True, capture_output=True, text=True).stdout.strip()


def clone_megatron(src: str, tag: str, dst: Path) -> None:
    """Clone ``src`` at ``tag`` into ``dst`` (a local repository is cloned whole, a URL shallowly)."""
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if Path(src).is_dir():
        git("clone", "-q", "--no-checkout", src, str(tmp))
        git("-C", str(tmp), "-c", "advice.detachedHead=false", "checkout", "-q", tag)
    else:
        git("-c", "advice.detachedHead=false", "clone", "-q", "--depth", "1", "--branch", tag, src, str(tmp))
    tmp.rename(dst)


def ensure_six() -> None:
    """preprocess_data.py's imports need ``six``; install it into this interpreter's environment if missing."""
    if importlib.util.find_spec("six") is None:
        log("megatron: installing six (pip) ...")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "six"], check=True)


def megatron_env(clone: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(clone)
    return env


def ensure_megatron(args: argparse.Namespace, workdir: Path) -> dict:
    clone = workdir / f"Megatron-LM-{args.tag}"
    if clone.exists():
        log(f"megatron: reusing {clone}")
    else:
        log(f"megatron: cloning {args.megatron_repo} at {args.tag} ...")
        clone_megatron(args.megatron_repo, args.tag, clone)
    head = git("-C", str(clone), "rev-parse", "HEAD")
    if head != git("-C", str(clone), "rev-parse", f"{args.tag}^{{commit}}"):
        raise SystemExit(f"{clone} is not at {args.tag}; remove it and rerun")
    ensure_six()
    used = subprocess.run([sys.executable, "-c", "import megatron.core; print(megatron.core.__file__)"],
                          env=megatron_env(clone), check=True, capture_output=True, text=True).stdout.strip()
    if not Path(used).resolve().is_relative_to(clone.resolve()):
        raise SystemExit(f"PYTHONPATH={clone} imports megatron.core from {used}, not from the clone")
    return {"repo": args.megatron_repo, "tag": args.tag, "commit": head, "clone": str(clone)}


# --------------------------------------------------------------------------- measuring a process tree


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(b")", 1)[1].split()[1])  # fields after "(comm)": state, ppid, ...
        children.setdefault(ppid, []).append(int(name))
    return children


def process_tree(root: int) -> list[int]:
    children = _children_map()
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def rss_bytes(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_bytes().split()[1]) * PAGE_SIZE
    except (OSError, IndexError):
        return 0


class TreeSampler(threading.Thread):
    """Samples the summed RSS (and the number of processes) of a process tree until stopped."""

    def __init__(self, root: int, interval: float):
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        self.peak_rss = 0
        self.peak_procs = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while True:
            tree = process_tree(self.root)
            self.peak_rss = max(self.peak_rss, sum(rss_bytes(pid) for pid in tree))
            self.peak_procs = max(self.peak_procs, len(tree))
            if self._stop_event.wait(self.interval):
                return

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def measure(cmd: list[str], env: dict, log_stem: Path, mem_interval: float) -> dict:
    """Run ``cmd``; return wall and CPU seconds, peak tree RSS and the largest process's max RSS."""
    stdout_path, stderr_path = log_stem.with_suffix(".stdout"), log_stem.with_suffix(".stderr")
    with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=REPO_ROOT)
        sampler = TreeSampler(proc.pid, mem_interval)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)  # usage covers the process and its reaped descendants
        wall = time.perf_counter() - t0
        sampler.stop()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = "\n".join(stderr_path.read_text(errors="replace").splitlines()[-30:])
        raise SystemExit(f"command failed with exit code {proc.returncode}: {' '.join(cmd)}\n{tail}")
    return {
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "user_s": usage.ru_utime,
        "sys_s": usage.ru_stime,
        # The tree's sum is at least its largest process's peak, which sampling may have missed.
        "peak_tree_rss_mib": max(sampler.peak_rss / MIB, usage.ru_maxrss / 1024),
        "max_rss_largest_process_mib": usage.ru_maxrss / 1024,  # Linux: KiB
        "peak_processes": sampler.peak_procs,
        "stdout": str(stdout_path),
    }


# --------------------------------------------------------------------------- the three tools


def keizoku_cmd(args, corpus: Path, prefix: Path, workers: int) -> list[str]:
    return [sys.executable, "-m", "keizoku", "tokenize", str(corpus), "--tokenizer", str(args.tokenizer),
            "--output-prefix", str(prefix), "--append-eod", "--workers", str(workers), "--quiet"]


def megatron_cmd(args, clone: Path, corpus: Path, prefix: Path, workers: int) -> list[str]:
    return [sys.executable, str(clone / "tools" / "preprocess_data.py"), "--input", str(corpus),
            "--output-prefix", str(prefix), "--tokenizer-type", "HuggingFaceTokenizer",
            "--tokenizer-model", str(args.tokenizer), "--append-eod", "--workers", str(workers),
            "--log-interval", "100000"]


def raw_hf_cmd(args, corpus: Path) -> list[str]:
    return [sys.executable, str(RAW_HF), str(corpus), "--tokenizer", str(args.tokenizer),
            "--batch-size", str(args.batch_size)]


def raw_hf_env(workers: int) -> dict:
    env = dict(os.environ)
    env["RAYON_NUM_THREADS"] = str(workers)
    env["TOKENIZERS_PARALLELISM"] = "true"
    return env


def dataset_paths(prefix: Path) -> tuple[Path, Path]:
    return indexed.dataset_paths(f"{prefix}_text_document")


def read_idx(prefix: Path) -> dict:
    """Token and document counts from a Megatron .idx (keizoku's reader of the format)."""
    ds = indexed.IndexedDatasetReader(f"{prefix}_text_document")
    return {"tokens": int(ds.sequence_lengths.sum(dtype=np.int64)), "documents": len(ds),
            "dtype_size": ds.dtype.itemsize}


def run_dataset_tool(name: str, cmd: list[str], env: dict, prefix: Path, logs: Path, tag: str,
                     mem_interval: float) -> dict:
    prefix.parent.mkdir(parents=True, exist_ok=True)
    result = measure(cmd, env, logs / f"{tag}-{name}", mem_interval)
    bin_path, idx_path = dataset_paths(prefix)
    counts = read_idx(prefix)
    if counts["tokens"] * counts["dtype_size"] != bin_path.stat().st_size:
        raise SystemExit(f"{bin_path}: size does not match the token count of {idx_path}")
    return {**result, "tokens": counts["tokens"], "documents": counts["documents"]}


def run_raw_hf(args, corpus: Path, workers: int, logs: Path, tag: str) -> dict:
    result = measure(raw_hf_cmd(args, corpus), raw_hf_env(workers), logs / f"{tag}-raw_hf", args.mem_interval)
    inner = json.loads(Path(result["stdout"]).read_text().strip().splitlines()[-1])
    # +1 EOD per non-empty document, as the two dataset writers count it.
    return {**result, "tokens": inner["tokens"] + inner["nonempty_docs"], "documents": inner["docs"],
            "encode_s": inner["encode_s"], "inner": inner}


def same_dataset(prefix_a: Path, prefix_b: Path) -> bool:
    return all(filecmp.cmp(a, b, shallow=False) for a, b in zip(dataset_paths(prefix_a), dataset_paths(prefix_b)))


def run_all(args, corpus: dict, clone: Path | None, workdir: Path) -> list[dict]:
    """All runs, interleaved: for each repeat, for each worker count, keizoku, Megatron, raw HF."""
    corpus_path = Path(corpus["path"])
    logs = workdir / "logs"
    logs.mkdir(exist_ok=True)
    runs = []
    for rep in range(1, args.repeats + 1):
        for workers in args.workers:
            tag = f"r{rep}-w{workers}"
            out = workdir / "outputs" / tag
            shutil.rmtree(out, ignore_errors=True)
            k_prefix, m_prefix = out / "keizoku" / "ja", out / "megatron" / "ja"
            step = []
            step.append({"tool": "keizoku", **run_dataset_tool(
                "keizoku", keizoku_cmd(args, corpus_path, k_prefix, workers), dict(os.environ), k_prefix,
                logs, tag, args.mem_interval)})
            report_run(rep, workers, corpus, step[-1])
            if clone is not None:
                step.append({"tool": "megatron", **run_dataset_tool(
                    "megatron", megatron_cmd(args, clone, corpus_path, m_prefix, workers), megatron_env(clone),
                    m_prefix, logs, tag, args.mem_interval)})
                report_run(rep, workers, corpus, step[-1])
                identical = same_dataset(k_prefix, m_prefix)
                for run in step:
                    run["identical"] = identical
                log(f"  byte-identical .bin/.idx: {'yes' if identical else 'NO'}")
            step.append({"tool": "raw_hf", **run_raw_hf(args, corpus_path, workers, logs, tag)})
            report_run(rep, workers, corpus, step[-1])
            for run in step:
                run.update(repeat=rep, workers=workers)
            runs += step
            if not args.keep_outputs:
                shutil.rmtree(out, ignore_errors=True)
    return runs


def report_run(rep: int, workers: int, corpus: dict, run: dict) -> None:
    log(f"[repeat {rep}, workers {workers}] {run['tool']:8s} {run['wall_s']:8.2f} s  "
        f"{corpus['bytes'] / MB / run['wall_s']:7.2f} MB/s  cpu {run['cpu_s']:7.2f} s  "
        f"tree RSS {run['peak_tree_rss_mib']:7.0f} MiB  ({run['tokens']:,} tokens)")


# --------------------------------------------------------------------------- summary and report


def summarize(runs: list[dict], corpus_bytes: int) -> list[dict]:
    """Medians per (tool, workers); raw HF's encode phase gets a row of its own."""
    rows = []
    for tool in TOOLS:
        for workers in sorted({r["workers"] for r in runs}):
            group = [r for r in runs if r["tool"] == tool and r["workers"] == workers]
            if not group:
                continue
            med = lambda values: statistics.median(values)  # noqa: E731
            rows.append({
                "tool": tool, "workers": workers, "runs": len(group),
                "wall_s": med([r["wall_s"] for r in group]),
                "mb_per_s": med([corpus_bytes / MB / r["wall_s"] for r in group]),
                "tokens_per_s": med([r["tokens"] / r["wall_s"] for r in group]),
                "cpu_s": med([r["cpu_s"] for r in group]),
                "peak_tree_rss_mib": med([r["peak_tree_rss_mib"] for r in group]),
                "max_rss_largest_process_mib": med([r["max_rss_largest_process_mib"] for r in group]),
                "tokens": group[0]["tokens"],
            })
            if tool == "raw_hf":
                rows.append({
                    "tool": "raw_hf_encode", "workers": workers, "runs": len(group),
                    "wall_s": med([r["encode_s"] for r in group]),
                    "mb_per_s": med([corpus_bytes / MB / r["encode_s"] for r in group]),
                    "tokens_per_s": med([r["tokens"] / r["encode_s"] for r in group]),
                    "tokens": group[0]["tokens"],
                })
    return rows


def ratios(rows: list[dict]) -> list[dict]:
    by = {(r["tool"], r["workers"]): r for r in rows}
    out = []
    for workers in sorted({r["workers"] for r in rows}):
        k = by[("keizoku", workers)]
        entry = {"workers": workers}
        for other in ("megatron", "raw_hf", "raw_hf_encode"):
            if (other, workers) in by:
                entry[f"keizoku_over_{other}"] = k["mb_per_s"] / by[(other, workers)]["mb_per_s"]
        out.append(entry)
    return out


def fmt(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def print_report(machine: dict, corpus: dict, megatron: dict | None, args, rows, speedups, runs) -> None:
    v = machine["versions"]
    print("# keizoku tokenize benchmark\n")
    print("## Machine\n")
    print(f"- CPU: {machine['cpu']}; nproc {machine['nproc']}, usable cores {machine['usable_cores']}; "
          f"memory {fmt(machine['memory_gib'], '.1f')} GiB; load average at start "
          f"{', '.join(f'{x:.2f}' for x in machine['load_average'])}")
    print(f"- {machine['platform']}; Python {machine['python']}")
    print("- " + ", ".join(f"{name} {ver}" for name, ver in v.items()))
    if megatron:
        print(f"- Megatron-LM {megatron['tag']} ({megatron['commit'][:12]}) from {megatron['repo']}")
    print("\n## Corpus\n")
    print(f"- {corpus['path']}: {corpus['bytes']:,} bytes ({corpus['bytes'] / MB:.1f} MB), {corpus['docs']:,} "
          f"documents, {rows[0]['tokens']:,} tokens with EOD; tokenizer {args.tokenizer}")
    print(f"\n## Medians of {args.repeats} run(s), interleaved\n")
    print("| tool | workers | wall s | MB/s | tokens/s | CPU s | peak RSS, tree sum (MiB) "
          "| max RSS, largest process (MiB) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {TOOL_LABELS[r['tool']]} | {r['workers']} | {r['wall_s']:.2f} | {r['mb_per_s']:.2f} "
              f"| {r['tokens_per_s']:,.0f} | {fmt(r.get('cpu_s'), '.2f')} | {fmt(r.get('peak_tree_rss_mib'), '.0f')} "
              f"| {fmt(r.get('max_rss_largest_process_mib'), '.0f')} |")
    print("\n## Speed ratios (MB/s, medians)\n")
    print("| workers | keizoku / preprocess_data.py | target ≥ 6× | keizoku / raw HF (whole) "
          "| keizoku / raw HF (encode only) |")
    print("|---:|---:|---|---:|---:|")
    for s in speedups:
        vs_m = s.get("keizoku_over_megatron")
        met = "—" if vs_m is None else ("met" if vs_m >= 6 else "not met")
        print(f"| {s['workers']} | {fmt(vs_m, '.2f')}{'' if vs_m is None else '×'} | {met} "
              f"| {s['keizoku_over_raw_hf']:.2f}× | {s['keizoku_over_raw_hf_encode']:.2f}× |")
    print("\n## Checks\n")
    pairs = [r for r in runs if r["tool"] == "keizoku" and "identical" in r]
    if pairs:
        bad = [f"repeat {r['repeat']} workers {r['workers']}" for r in pairs if not r["identical"]]
        print(f"- byte-identical .bin/.idx (keizoku vs preprocess_data.py): "
              f"{len(pairs) - len(bad)}/{len(pairs)} pairs" + (f"; DIFFERENT: {', '.join(bad)}" if bad else ""))
    else:
        print("- byte identity not checked (--skip-megatron)")
    counts = {(r["tool"], r["tokens"]) for r in runs}
    tokens = {t for _, t in counts}
    print(f"- token counts (with EOD) agree across tools and runs: {'yes' if len(tokens) == 1 else counts}")


# --------------------------------------------------------------------------- main


def main() -> int:
    args = parse_args()
    own_workdir = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="keizoku-bench-")) if own_workdir else args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    log(f"workdir: {workdir}")
    try:
        machine = machine_info()
        corpus = ensure_corpus(args, workdir)
        megatron = None if args.skip_megatron else ensure_megatron(args, workdir)
        clone = Path(megatron["clone"]) if megatron else None
        runs = run_all(args, corpus, clone, workdir)
        rows = summarize(runs, corpus["bytes"])
        speedups = ratios(rows)
        print_report(machine, corpus, megatron, args, rows, speedups, runs)
        all_identical = all(r.get("identical", True) for r in runs)
        if args.json:
            args.json.write_text(json.dumps({
                "machine": machine, "corpus": corpus, "megatron": megatron,
                "config": {"tokenizer": str(args.tokenizer), "workers": args.workers, "repeats": args.repeats,
                           "size_mb": args.size_mb, "seed": args.seed, "batch_size": args.batch_size,
                           "mem_interval_s": args.mem_interval},
                "runs": runs, "medians": rows, "speed_ratios": speedups, "byte_identical": all_identical,
            }, indent=2, ensure_ascii=False) + "\n")
            log(f"raw results: {args.json}")
    finally:
        if own_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    if not all_identical:
        log("FAIL: keizoku's output differs from preprocess_data.py's (see the Checks section)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
