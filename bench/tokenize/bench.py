"""Side-by-side benchmark of ``keizoku tokenize``, Megatron-LM's two preprocessing tools, and raw HF / gigatoken.

One invocation measures, interleaved and on the same corpora, every program that turns JSONL into a Megatron
indexed dataset (``.bin``/``.idx``) or could be the core of one:

- ``keizoku``: ``python -m keizoku tokenize`` at ``--workers 1`` and at ``--workers N``;
- ``megatron``: Megatron-LM's ``tools/preprocess_data.py`` at N workers (and at 1 with ``--megatron-w1``), from
  the Megatron-LM tree given by ``--megatron`` (a directory or a ``git archive`` .tar.gz; default tag of the
  tarball that bench/tokenize/gpu.sh carries: core_v0.16.1);
- ``megatron_fast``: Megatron-LM's ``tools/preprocess_data_fast.py --use-gigatoken`` (PR #6514: gigatoken encodes
  the whole file on its own thread pool; ``RAYON_NUM_THREADS=N``), from the tree given by ``--megatron-fast``;
- ``raw_hf``: ``raw_hf.py``, Hugging Face tokenizers' ``encode_batch`` on N threads, writing nothing;
- ``raw_gigatoken``: ``raw_gigatoken.py``, gigatoken's ``encode_files`` (mode files) or ``encode_batch`` (mode
  batch, as raw_hf) on N threads, writing nothing;

for each tokenizer (``--tokenizers``; gigatoken refuses Unigram ones such as llm-jp-3: recorded as "refused"),
each corpus (``repeating``: documents of 1-8 random paragraphs of SHARED/data/ja_sample.jsonl.gz, and
``nonrepeating``: the same documents with a random ASCII letter before every 、 and 。, so no piece of text repeats
and no tokenizer cache helps) and each format (``.jsonl``; ``.jsonl.gz``, which preprocess_data.py cannot read
without --partitions). The slow tools run on a prefix (the *slice*) of the corpus, the fast ones on all of it;
throughput is MB of JSONL text per second of wall time (startup included), so ratios are per MB. A separate
*memory* phase writes a ≥ ``--memory-gb`` GB non-repeating corpus and records the peak memory of keizoku at N
workers, preprocess_data_fast.py and raw gigatoken on it. Every dataset written is fingerprinted (SHA-256 of
.bin and .idx): all that were made from the same text (any tool, workers, format) must be byte-identical; the exit
status is 1 if a keizoku dataset differs from another keizoku one or from preprocess_data.py's.

    .venv/bin/python bench/tokenize/bench.py --megatron MEGATRON.tar.gz --megatron-fast MEGATRON-NEW.tar.gz \\
        --json results.json                     # the full run (bench/tokenize/gpu.sh on the GPU machine)
    .venv/bin/python bench/tokenize/bench.py --quick --megatron ... --megatron-fast ...   # < 1 min check

README.md ("Running it") says exactly what runs on what.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import gzip
import hashlib
import importlib.metadata
import importlib.util
import json
import multiprocessing
import os
import platform
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from keizoku.data import indexed

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
RAW_HF = HERE / "raw_hf.py"
RAW_GIGATOKEN = HERE / "raw_gigatoken.py"
DATASET_TOOLS = ("keizoku", "megatron", "megatron_fast")
TOOL_LABELS = {
    "keizoku": "keizoku tokenize",
    "megatron": "Megatron preprocess_data.py",
    "megatron_fast": "Megatron preprocess_data_fast.py (gigatoken)",
    "raw_hf": "raw HF encode_batch",
    "raw_gigatoken": "raw gigatoken",
}
CORPORA = ("repeating", "nonrepeating")
FORMATS = ("jsonl", "gz")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
MB = 1e6
MIB = 1024 * 1024
PARTS = 16  # a corpus is made of this many parts, each from its own seed: the same bytes on any machine
PUNCT = re.compile("([、。])")
LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


# --------------------------------------------------------------------------- arguments


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="A check of the script (< 1 min on 2 cores): 3 MB corpus (slice = whole), nonrepeating only, "
                   "first tokenizer only, preprocess_data_fast.py on .jsonl only, a 10 MB memory phase without it; "
                   "explicit options still win.")
    p.add_argument("--shared", type=Path, default=REPO_ROOT.parent / "shared",
                   help="The shared data directory (default: ../shared next to the repository).")
    p.add_argument("--sample", type=Path, default=None,
                   help="The paragraphs' source (default: SHARED/data/ja_sample.jsonl.gz).")
    p.add_argument("--tokenizers", default=None,
                   help="Comma-separated tokenizer directories (default: SHARED/tokenizers/llama3.1,"
                   "SHARED/tokenizers/llm-jp-3).")
    p.add_argument("--corpora", default=None, help=f"Comma-separated, of {', '.join(CORPORA)} (default: both).")
    p.add_argument("--formats", default="jsonl,gz", help="Comma-separated, of jsonl, gz.")
    p.add_argument("--size-mb", type=float, default=None, help="Corpus size, MB of JSONL (default 400).")
    p.add_argument("--slice-mb", type=float, default=None,
                   help="The prefix of the corpus the slow tools run on (default 100).")
    p.add_argument("--workers", type=int, default=usable_cores(),
                   help="N, the many-worker count (default: usable cores, %(default)s); keizoku also runs at 1.")
    p.add_argument("--repeats", type=int, default=1, help="Runs of each measurement (interleaved).")
    p.add_argument("--megatron", type=Path, default=None,
                   help="Megatron-LM tree for preprocess_data.py: a directory or a `git archive` .tar.gz (with "
                   "megatron/ and tools/). Without it, preprocess_data.py is not run.")
    p.add_argument("--megatron-fast", type=Path, default=None,
                   help="Megatron-LM tree with tools/preprocess_data_fast.py (PR #6514 or later), likewise.")
    p.add_argument("--megatron-w1", action="store_true",
                   help="Also run preprocess_data.py at 1 worker (slow: on a --w1-slice-mb prefix).")
    p.add_argument("--w1-slice-mb", type=float, default=None, help="Prefix for --megatron-w1 (default 20).")
    p.add_argument("--memory-gb", type=float, default=None,
                   help="Memory phase corpus size, GB (default 4; 0: no memory phase).")
    p.add_argument("--memory-tools", default=None,
                   help="Comma-separated tools of the memory phase (default keizoku,megatron_fast,raw_gigatoken; "
                   "--quick: keizoku,raw_gigatoken).")
    p.add_argument("--phases", default="main,memory", help="Comma-separated, of main, memory.")
    p.add_argument("--seed", type=int, default=0, help="Seed of the corpora.")
    p.add_argument("--batch-size", type=int, default=1000, help="Documents per encode_batch call (raw tools).")
    p.add_argument("--mem-interval", type=float, default=0.2, help="Seconds between RSS samples.")
    p.add_argument("--run-timeout", type=float, default=300, help="Seconds before a run is killed (and recorded).")
    p.add_argument("--workdir", type=Path, default=None,
                   help="Corpora, Megatron trees, outputs, logs (default: a temporary directory, removed at the "
                   "end). Give one to keep the corpora between invocations.")
    p.add_argument("--keep-outputs", action="store_true", help="Keep every run's .bin/.idx.")
    p.add_argument("--json", type=Path, default=None,
                   help="Write every raw measurement here (rewritten after each run, so a run cut short keeps "
                   "what was measured).")
    args = p.parse_args()
    q = args.quick
    args.size_mb = args.size_mb or (3.0 if q else 400.0)
    args.slice_mb = min(args.slice_mb or (3.0 if q else 100.0), args.size_mb)
    args.w1_slice_mb = min(args.w1_slice_mb or (1.0 if q else 20.0), args.slice_mb)
    args.memory_gb = (0.01 if q else 4.0) if args.memory_gb is None else args.memory_gb
    args.sample = args.sample or args.shared / "data" / "ja_sample.jsonl.gz"
    toks = args.tokenizers or ",".join(str(args.shared / "tokenizers" / t) for t in ("llama3.1", "llm-jp-3"))
    args.tokenizers = [Path(t) for t in toks.split(",") if t]
    if q and not _given("--tokenizers"):
        args.tokenizers = args.tokenizers[:1]
    args.corpora = (args.corpora or ("nonrepeating" if q else ",".join(CORPORA))).split(",")
    args.formats = args.formats.split(",")
    args.phases = args.phases.split(",")
    args.memory_tools = (args.memory_tools or ("keizoku,raw_gigatoken" if q else
                                               "keizoku,megatron_fast,raw_gigatoken")).split(",")
    for name, values, allowed in (("--corpora", args.corpora, CORPORA), ("--formats", args.formats, FORMATS),
                                  ("--phases", args.phases, ("main", "memory")),
                                  ("--memory-tools", args.memory_tools, ("keizoku", "megatron_fast", "raw_gigatoken"))):
        if not set(values) <= set(allowed):
            p.error(f"{name}: expected some of {', '.join(allowed)}")
    if args.repeats < 1 or args.workers < 1:
        p.error("--repeats and --workers must be >= 1")
    return args


def _given(option: str) -> bool:
    return any(a == option or a.startswith(option + "=") for a in sys.argv[1:])


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
    from keizoku.data import readers

    decompressors = {}
    for stream in ("gzip", "zstd"):
        try:
            decompressors[stream] = readers.decompressor(stream)
        except (AttributeError, ImportError) as e:
            decompressors[stream] = f"unknown ({e})"
    return {
        "nproc": os.cpu_count(),
        "usable_cores": usable_cores(),
        "cpu": cpu_model(),
        "memory_gib": mem_total_gib(),
        "load_average": os.getloadavg(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "versions": {d: version_of(d) for d in
                     ("keizoku", "torch", "transformers", "tokenizers", "tiktoken", "numpy", "megatron-core",
                      "gigatoken", "awkward", "isal", "zstandard", "orjson")},
        "keizoku_decompressors": decompressors,
        "keizoku_c_extensions": {m: importlib.util.find_spec(f"keizoku.{m}") is not None for m in ("_bpe", "_unigram")},
        "megatron_pythonpath_shims": [str(p) for p in MEGATRON_SHIMS],
    }


# --------------------------------------------------------------------------- corpora


def load_paragraphs(sample_gz: Path) -> list[str]:
    """All non-empty paragraphs ("\\n\\n"-separated) of the sample's documents, in file order."""
    paragraphs = []
    with gzip.open(sample_gz, "rt", encoding="utf-8") as f:
        for line in f:
            paragraphs += [p for p in json.loads(line)["text"].split("\n\n") if p.strip()]
    return paragraphs


def nonrepeating(text: str, rng: random.Random) -> str:
    """``text`` with a random ASCII letter before every 、 and 。."""
    pieces = PUNCT.split(text)  # text, mark, text, mark, ..., text
    marks = pieces[1::2]
    pieces[1::2] = [a + m for a, m in zip(rng.choices(LETTERS, k=len(marks)), marks)]
    return "".join(pieces)


_PARAGRAPHS: list[str] = []


def _write_part(job: tuple) -> tuple[int, dict]:
    """Part ``k`` of the corpora: documents of 1-8 distinct random paragraphs in random order (a document drawn
    before is drawn again: no two lines of a part are equal), seeded by (seed, k), until the part of the first
    variant in ``outs`` holds ``target`` bytes. ``outs``: variant -> path."""
    k, seed, target, outs = job
    rng, letters = random.Random(f"{seed}:{k}"), random.Random(f"{seed}:{k}:letters")
    seen: set[bytes] = set()
    files = {v: open(p, "wb") for v, p in outs.items()}
    sizes = dict.fromkeys(outs, 0)
    first = next(iter(outs))
    docs = 0
    try:
        while sizes[first] < target:
            n = rng.randint(1, min(8, len(_PARAGRAPHS)))
            text = "\n\n".join(rng.sample(_PARAGRAPHS, n))
            digest = hashlib.blake2b(text.encode(), digest_size=16).digest()
            if digest in seen:
                continue
            seen.add(digest)
            docs += 1
            for v, f in files.items():
                t = text if v == "repeating" else nonrepeating(text, letters)
                line = (json.dumps({"text": t}, ensure_ascii=False) + "\n").encode()
                f.write(line)
                sizes[v] += len(line)
    finally:
        for f in files.values():
            f.close()
    return docs, sizes


def _init_paragraphs(paragraphs: list[str]) -> None:
    global _PARAGRAPHS
    _PARAGRAPHS = paragraphs


def build_corpora(args, workdir: Path, size_mb: float, variants: list[str], tag: str) -> dict[str, Path]:
    """``variants`` of a ``size_mb`` MB corpus (the size of the first variant), each the concatenation of PARTS
    parts written in parallel; reused when already in ``workdir``."""
    paths = {v: workdir / f"{tag}-{v}-{size_mb:g}MB-seed{args.seed}.jsonl" for v in variants}
    missing = [v for v in variants if not paths[v].exists()]
    if not missing:
        log(f"corpus: reusing {', '.join(str(p) for p in paths.values())}")
        return paths
    # every variant of the documents is written in one pass; the first one present decides their number
    order = [v for v in CORPORA if v in variants]
    log(f"corpus: writing {size_mb:g} MB of {' + '.join(order)} ({PARTS} parts, {min(PARTS, usable_cores())} "
        f"processes) ...")
    t = time.perf_counter()
    paragraphs = load_paragraphs(args.sample)
    parts_dir = workdir / f"parts-{tag}"
    parts_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(k, args.seed, size_mb * MB / PARTS, {v: parts_dir / f"{v}-{k:02d}.jsonl" for v in order})
            for k in range(PARTS)]
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(min(PARTS, usable_cores()), initializer=_init_paragraphs, initargs=(paragraphs,)) as pool:
        pool.map(_write_part, jobs, chunksize=1)
    for v in order:
        tmp = paths[v].with_name(paths[v].name + ".tmp")
        with open(tmp, "wb") as out:
            for _, _, _, outs in jobs:
                with open(outs[v], "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 24)
                outs[v].unlink()
        tmp.rename(paths[v])
    shutil.rmtree(parts_dir, ignore_errors=True)
    log(f"corpus: {time.perf_counter() - t:.1f} s")
    return paths


def slice_of(src: Path, mb: float) -> Path:
    """The first lines of ``src`` up to ``mb`` MB (the first line past it included); ``src`` if that is all."""
    if mb * MB >= src.stat().st_size:
        return src
    dst = src.with_name(f"{src.stem}-first{mb:g}MB.jsonl")
    if not dst.exists():
        with open(src, "rb") as f:
            data = f.read(int(mb * MB))
            data += f.readline()
        tmp = dst.with_name(dst.name + ".tmp")
        tmp.write_bytes(data)
        tmp.rename(dst)
    return dst


def gzipped(src: Path, threads: int, block: int = 16 << 20) -> Path:
    """``src`` gzip-compressed (level 6) as one member per 16 MiB, compressed in parallel (as pigz --independent
    or bgzip write them; one stream to every gzip reader)."""
    dst = src.with_name(src.name + ".gz")
    if dst.exists():
        return dst
    tmp = dst.with_name(dst.name + ".tmp")
    with open(src, "rb") as f, open(tmp, "wb") as out, \
            concurrent.futures.ThreadPoolExecutor(max(1, threads)) as pool:
        pending: list = []
        while data := f.read(block):
            pending.append(pool.submit(gzip.compress, data, 6, mtime=0))
            if len(pending) > 2 * threads:
                out.write(pending.pop(0).result())
        for fut in pending:
            out.write(fut.result())
    tmp.rename(dst)
    return dst


def corpus_stats(path: Path) -> dict:
    with open(path, "rb") as f:
        docs = sum(1 for _ in f)
    return {"path": str(path), "bytes": path.stat().st_size, "docs": docs}


# --------------------------------------------------------------------------- Megatron-LM trees


def megatron_tree(src: Path, workdir: Path, name: str) -> dict:
    """A Megatron-LM tree in the work directory: ``src`` extracted (a `git archive` .tar.gz) or copied (a
    directory); its commit from the archive's header or the directory's git. Never inside this repository."""
    src = src.resolve()
    commit = None
    if src.is_file():
        with tarfile.open(src) as t:
            commit = t.pax_headers.get("comment")
        dst = workdir / f"{name}-{(commit or src.name)[:12]}"
        if not dst.exists():
            tmp = dst.with_name(dst.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            with tarfile.open(src) as t:
                t.extractall(tmp, filter="data")
            tmp.rename(dst)
    else:
        try:
            commit = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], check=True, capture_output=True,
                                    text=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            commit = None
        dst = workdir / f"{name}-{(commit or 'dir')[:12]}"
        if not dst.exists():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".git"))
    probe = "import importlib.util as u; print(u.find_spec('megatron.core').origin)"
    found = subprocess.run([sys.executable, "-c", probe],
                           env=with_pythonpath(dst), capture_output=True, text=True, cwd=dst, check=False)
    origin = found.stdout.strip()
    if found.returncode != 0 or not Path(origin).resolve().is_relative_to(dst.resolve()):
        raise SystemExit(f"PYTHONPATH={dst} imports megatron.core from {origin or found.stderr[-500:]}, not the tree")
    return {"source": str(src), "commit": commit, "tree": str(dst)}


def ensure_six() -> None:
    """preprocess_data.py's imports need ``six``; install it into this interpreter's environment if missing."""
    if importlib.util.find_spec("six") is None:
        log("megatron: installing six (pip) ...")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "six"], check=True)


def with_pythonpath(*first: Path, **extra: str) -> dict:
    """This environment with ``first`` ahead of its PYTHONPATH, and ``extra`` variables."""
    env = dict(os.environ, **extra)
    if first:
        env["PYTHONPATH"] = os.pathsep.join([*map(str, first), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


# Where Triton is missing (the CPU dev machines), Megatron-LM's top-level `import triton`s are guarded by
# bench/megatron's import hook (bench/megatron/te_absent.py): enough for preprocess_data.py of core_v0.16.1, not
# for the newest tree. The GPU machine has Triton: nothing is added there.
MEGATRON_SHIMS = [] if importlib.util.find_spec("triton") else [REPO_ROOT / "bench" / "megatron" / "site"]


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


def pss_bytes(pid: int) -> int:
    """Proportional set size: shared pages divided among the processes that map them (sums without double
    counting copy-on-write pages of forked workers)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, IndexError, ValueError):
        pass
    return 0


class TreeSampler(threading.Thread):
    """Samples the summed RSS and PSS of a process tree every ``interval`` until stopped."""

    def __init__(self, root: int, interval: float):
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        self.peak_rss = self.peak_pss = self.peak_procs = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while True:
            tree = process_tree(self.root)
            self.peak_rss = max(self.peak_rss, sum(rss_bytes(pid) for pid in tree))
            self.peak_pss = max(self.peak_pss, sum(pss_bytes(pid) for pid in tree))
            self.peak_procs = max(self.peak_procs, len(tree))
            if self._stop_event.wait(self.interval):
                return

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class RunFailed(Exception):
    def __init__(self, message: str, returncode: int | None, stdout: Path, stderr: Path):
        super().__init__(message)
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def measure(cmd: list[str], env: dict, log_stem: Path, mem_interval: float, timeout: float) -> dict:
    """Run ``cmd``; return wall and CPU seconds, peak tree RSS/PSS and the largest process's max RSS."""
    stdout_path, stderr_path = (log_stem.with_name(log_stem.name + x) for x in (".stdout", ".stderr"))
    with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=REPO_ROOT, start_new_session=True)
        sampler = TreeSampler(proc.pid, mem_interval)
        sampler.start()
        killer = threading.Timer(timeout, _kill_group, (proc.pid,))
        killer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)  # usage covers the process and its reaped descendants
        finally:  # also when this script is stopped (SIGTERM: see main): the run's processes go with it
            wall = time.perf_counter() - t0
            killer.cancel()
            sampler.stop()
            _kill_group(proc.pid)  # whatever the run left behind
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = "\n".join(stderr_path.read_text(errors="replace").splitlines()[-20:])
        why = f"killed after {timeout:.0f} s" if wall >= timeout else f"exit code {proc.returncode}"
        raise RunFailed(f"{why}: {' '.join(cmd)}\n{tail}", proc.returncode, stdout_path, stderr_path)
    return {
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "user_s": usage.ru_utime,
        "sys_s": usage.ru_stime,
        # The tree's sum is at least its largest process's peak, which sampling may have missed.
        "peak_tree_rss_mib": max(sampler.peak_rss / MIB, usage.ru_maxrss / 1024),
        "peak_tree_pss_mib": sampler.peak_pss / MIB or None,
        "max_rss_largest_process_mib": usage.ru_maxrss / 1024,  # Linux: KiB
        "peak_processes": sampler.peak_procs,
        "stdout": str(stdout_path),
    }


# --------------------------------------------------------------------------- the tools


class Bench:
    def __init__(self, args, workdir: Path, machine: dict):
        self.args, self.workdir, self.machine = args, workdir, machine
        self.logs = workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.runs: list[dict] = []
        self.corpora: dict[str, dict] = {}
        self.refused: dict[tuple[str, str], str] = {}  # (tool, tokenizer) -> why
        self.megatron = megatron_tree(args.megatron, workdir, "megatron") if args.megatron else None
        self.megatron_fast = megatron_tree(args.megatron_fast, workdir, "megatron-fast") if args.megatron_fast else None
        if self.megatron:
            ensure_six()
        self.started = time.perf_counter()
        self.count = 0

    # ---- commands

    def command(self, tool: str, workers: int, tok: Path, inp: Path, prefix: Path | None, mode: str | None):
        a = self.args
        if tool == "keizoku":
            return ([sys.executable, "-m", "keizoku", "tokenize", str(inp), "--tokenizer", str(tok),
                     "--output-prefix", str(prefix), "--append-eod", "--workers", str(workers), "--quiet"],
                    dict(os.environ))
        if tool == "megatron":
            tree = Path(self.megatron["tree"])
            return ([sys.executable, str(tree / "tools" / "preprocess_data.py"), "--input", str(inp),
                     "--output-prefix", str(prefix), "--tokenizer-type", "HuggingFaceTokenizer",
                     "--tokenizer-model", str(tok), "--append-eod", "--workers", str(workers),
                     "--log-interval", "1000000"], with_pythonpath(tree, *MEGATRON_SHIMS))
        if tool == "megatron_fast":
            tree = Path(self.megatron_fast["tree"])
            return ([sys.executable, str(tree / "tools" / "preprocess_data_fast.py"), "--input", str(inp),
                     "--output-prefix", str(prefix), "--tokenizer-type", "HuggingFaceTokenizer",
                     "--tokenizer-model", str(tok), "--use-gigatoken", "--append-eod"],
                    with_pythonpath(tree, *MEGATRON_SHIMS, RAYON_NUM_THREADS=str(workers)))
        if tool == "raw_hf":
            return ([sys.executable, str(RAW_HF), str(inp), "--tokenizer", str(tok), "--batch-size",
                     str(a.batch_size)],
                    with_pythonpath(RAYON_NUM_THREADS=str(workers), TOKENIZERS_PARALLELISM="true"))
        if tool == "raw_gigatoken":
            return ([sys.executable, str(RAW_GIGATOKEN), str(inp), "--tokenizer", str(tok), "--mode", mode,
                     "--batch-size", str(a.batch_size)], with_pythonpath(RAYON_NUM_THREADS=str(workers)))
        raise ValueError(tool)

    def skipped(self, tool: str) -> str | None:
        """Why ``tool`` is not run at all ("" for a Megatron tool whose tree was not given: nothing recorded)."""
        if tool == "megatron" and self.megatron is None or tool == "megatron_fast" and self.megatron_fast is None:
            return ""
        if tool in ("raw_gigatoken", "megatron_fast") and importlib.util.find_spec("gigatoken") is None:
            return "gigatoken is not importable here"
        return None

    # ---- one run

    def run(self, tool: str, workers: int, tok: Path, inp: Path, *, phase: str, corpus: str, fmt: str,
            text_range: str, text_bytes: int, repeat: int, mode: str | None = None) -> dict | None:
        """Run one tool on one input; record the measurement (or why there is none); None if not run."""
        a = self.args
        key = (tool, str(tok))
        base = {"phase": phase, "tokenizer": tok.name, "tokenizer_path": str(tok), "corpus": corpus, "format": fmt,
                "range": text_range, "input": str(inp), "input_disk_bytes": inp.stat().st_size,
                "text_bytes": text_bytes, "tool": tool, "workers": workers, "repeat": repeat}
        if mode:
            base["mode"] = mode
        why = self.skipped(tool)
        if why is not None:
            if why:
                self.record({**base, "status": "skipped", "message": why})
            return None
        if key in self.refused:
            self.record({**base, "status": "refused", "message": self.refused[key], "measured": False})
            return None
        self.count += 1
        tag = f"{self.count:03d}-{phase}-{tok.name}-{corpus}-{text_range}-{fmt}-{tool}{mode or ''}-w{workers}-r{repeat}"
        out = self.workdir / "out" / tag
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        prefix = out / "ja" if tool in DATASET_TOOLS else None
        cmd, env = self.command(tool, workers, tok, inp, prefix, mode)
        try:
            result = measure(cmd, env, self.logs / tag, a.mem_interval, a.run_timeout)
        except RunFailed as e:
            why = self._refusal(tool, e)
            if why:
                self.refused[key] = why
                self.record({**base, "status": "refused", "message": why, "stderr": str(e.stderr)})
                log(f"  {tool} refused {tok.name}: {why}")
            else:
                self.record({**base, "status": "failed", "message": str(e)[-3000:], "stderr": str(e.stderr)})
                lines = str(e).splitlines()
                log(f"  {tool} FAILED ({lines[0][:200]}): ... {' | '.join(lines[-3:])[-600:]} (log: {e.stderr})")
            shutil.rmtree(out, ignore_errors=True)
            return None
        rec = {**base, "status": "ok", **result}
        if prefix is not None:
            rec.update(self._dataset(prefix))
        else:
            inner = json.loads(Path(result["stdout"]).read_text().strip().splitlines()[-1])
            rec.update(tokens=inner["tokens"] + inner["nonempty_docs"], documents=inner["docs"],
                       encode_s=inner["encode_s"], inner=inner)  # +1 EOD per non-empty document, as datasets count
        rec["mb_per_s"] = text_bytes / MB / rec["wall_s"]
        if not a.keep_outputs:
            shutil.rmtree(out, ignore_errors=True)
        self.record(rec)
        log(f"[{time.perf_counter() - self.started:6.0f} s] {phase} {tok.name} {corpus} {text_range} {fmt} "
            f"{tool}{'/' + mode if mode else ''} w{workers}: {rec['wall_s']:.2f} s, {rec['mb_per_s']:.1f} MB/s, "
            f"cpu {rec['cpu_s']:.1f} s, tree RSS {rec['peak_tree_rss_mib']:.0f} MiB, "
            f"largest {rec['max_rss_largest_process_mib']:.0f} MiB, {rec['tokens']:,} tokens")
        return rec

    @staticmethod
    def _refusal(tool: str, e: RunFailed) -> str | None:
        """gigatoken's refusal of a tokenizer it cannot load (a Unigram one), from either gigatoken tool."""
        if tool == "raw_gigatoken" and e.returncode == 3:
            try:
                return json.loads(e.stdout.read_text().strip().splitlines()[-1])["refused"]
            except (ValueError, KeyError, IndexError, OSError):
                return None
        if tool == "megatron_fast":
            text = e.stderr.read_text(errors="replace")
            m = re.search(r"^\w*Error: (Unsupported model type.*)$", text, re.M)
            return m.group(1).strip() if m else None
        return None

    @staticmethod
    def _dataset(prefix: Path) -> dict:
        """Counts from the .idx (checked against the .bin size) and both files' SHA-256."""
        path = f"{prefix}_text_document"
        ds = indexed.IndexedDatasetReader(path)
        tokens = int(ds.sequence_lengths.sum(dtype=np.int64))
        bin_path, idx_path = indexed.dataset_paths(path)
        if tokens * ds.dtype.itemsize != bin_path.stat().st_size:
            raise SystemExit(f"{bin_path}: size does not match the token count of {idx_path}")
        digests = {}
        for p in (bin_path, idx_path):
            with open(p, "rb") as f:
                digests[p.suffix[1:] + "_sha256"] = hashlib.file_digest(f, "sha256").hexdigest()
        return {"tokens": tokens, "documents": len(ds), "dtype_size": ds.dtype.itemsize, **digests}

    def record(self, rec: dict) -> None:
        self.runs.append(rec)
        self.save()

    def save(self, final: dict | None = None) -> None:
        if not self.args.json:
            return
        a = self.args
        doc = {"machine": self.machine, "corpora": self.corpora, "megatron": self.megatron,
               "megatron_fast": self.megatron_fast,
               "config": {"quick": a.quick, "tokenizers": [str(t) for t in a.tokenizers], "corpora": a.corpora,
                          "formats": a.formats, "size_mb": a.size_mb, "slice_mb": a.slice_mb,
                          "w1_slice_mb": a.w1_slice_mb, "megatron_w1": a.megatron_w1, "workers": a.workers,
                          "repeats": a.repeats, "memory_gb": a.memory_gb, "memory_tools": a.memory_tools,
                          "phases": a.phases, "seed": a.seed, "parts": PARTS, "batch_size": a.batch_size,
                          "mem_interval_s": a.mem_interval, "run_timeout_s": a.run_timeout},
               "complete": final is not None and final.get("stopped") is None, "runs": self.runs, **(final or {})}
        tmp = a.json.with_name(a.json.name + ".tmp")
        tmp.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
        tmp.rename(a.json)

    # ---- the phases

    def warm_up(self) -> None:
        """keizoku caches its prepared tokenizer tables on disk at its first run with a tokenizer (as a user's
        first run does): one run per tokenizer used on a few lines first, recorded apart from the others."""
        tiny = self.workdir / "warmup.jsonl"
        with gzip.open(self.args.sample, "rb") as f:
            tiny.write_bytes(b"".join(f.readline() for _ in range(20)))
        for tok in self.args.tokenizers if "main" in self.args.phases else self.args.tokenizers[:1]:
            self.run("keizoku", 1, tok, tiny, phase="warmup", corpus="sample", fmt="jsonl", text_range="first20",
                     text_bytes=tiny.stat().st_size, repeat=1)

    def main_phase(self) -> None:
        a, n = self.args, self.args.workers
        full = build_corpora(a, self.workdir, a.size_mb, a.corpora, "main")
        inputs = {}
        for corpus, path in full.items():
            sl = path if a.slice_mb >= a.size_mb else slice_of(path, a.slice_mb)
            w1 = None if not a.megatron_w1 else sl if a.w1_slice_mb >= a.slice_mb else slice_of(path, a.w1_slice_mb)
            ranges = {"full": path, "slice": sl, **({"w1slice": w1} if w1 else {})}
            inputs[corpus] = {}
            for name, p in ranges.items():
                stats = corpus_stats(p)
                entry = {"jsonl": p, "text_bytes": stats["bytes"], "docs": stats["docs"]}
                if "gz" in a.formats and name in ("full", "slice"):
                    entry["gz"] = gzipped(p, usable_cores())
                inputs[corpus][name] = entry
                self.corpora[f"{corpus}/{name}"] = {**stats, **({"gz": str(entry["gz"]),
                                                                   "gz_bytes": entry["gz"].stat().st_size}
                                                                  if "gz" in entry else {})}
            self.save()
        for rep in range(1, a.repeats + 1):
            for tok in a.tokenizers:
                for corpus in a.corpora:
                    self._cell(tok, corpus, inputs[corpus], rep, n)

    def _cell(self, tok: Path, corpus: str, inputs: dict, rep: int, n: int) -> None:
        a = self.args

        def go(tool, workers, rng, fmt, mode=None):
            e = inputs[rng]
            self.run(tool, workers, tok, e[fmt], phase="main", corpus=corpus, fmt=fmt, text_range=rng,
                     text_bytes=e["text_bytes"], repeat=rep, mode=mode)

        if "jsonl" in a.formats:
            go("keizoku", 1, "slice", "jsonl")
            go("keizoku", n, "slice", "jsonl")
            go("megatron", n, "slice", "jsonl")
            go("raw_hf", n, "slice", "jsonl")
            go("raw_gigatoken", n, "slice", "jsonl", "batch")
            if a.megatron_w1:
                if inputs["w1slice"]["jsonl"] != inputs["slice"]["jsonl"]:
                    go("keizoku", 1, "w1slice", "jsonl")
                go("megatron", 1, "w1slice", "jsonl")
            go("keizoku", n, "full", "jsonl")  # again when the slice is all of it: each range has its own rows
            go("megatron_fast", n, "full", "jsonl")
            go("raw_gigatoken", n, "full", "jsonl", "files")
        if "gz" in a.formats:
            go("keizoku", 1, "slice", "gz")
            go("keizoku", n, "full", "gz")
            if not a.quick:
                go("megatron_fast", n, "full", "gz")
            go("raw_gigatoken", n, "full", "gz", "files")

    def memory_phase(self) -> None:
        a, n = self.args, self.args.workers
        path = build_corpora(a, self.workdir, a.memory_gb * 1000, ["nonrepeating"], "memory")["nonrepeating"]
        stats = corpus_stats(path)
        self.corpora["nonrepeating/memory"] = stats
        self.save()
        tok = a.tokenizers[0]
        for rep in range(1, a.repeats + 1):
            for tool in a.memory_tools:
                self.run(tool, n, tok, path, phase="memory", corpus="nonrepeating", fmt="jsonl", text_range="memory",
                         text_bytes=stats["bytes"], repeat=rep, mode="files" if tool == "raw_gigatoken" else None)


# --------------------------------------------------------------------------- summary and report


def summarize(runs: list[dict]) -> list[dict]:
    """Medians per (phase, tokenizer, corpus, range, format, tool, mode, workers) of the runs that were measured."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        if r["phase"] == "warmup":
            continue
        key = (r["phase"], r["tokenizer"], r["corpus"], r["range"], r["format"], r["tool"], r.get("mode"),
               r["workers"])
        groups.setdefault(key, []).append(r)
    rows = []
    for key, group in groups.items():
        ok = [r for r in group if r["status"] == "ok"]
        row = dict(zip(("phase", "tokenizer", "corpus", "range", "format", "tool", "mode", "workers"), key))
        row["text_mb"] = group[0]["text_bytes"] / MB
        if not ok:
            row.update(status=group[0]["status"], message=group[0].get("message", ""))
            rows.append(row)
            continue
        med = statistics.median
        row.update(status="ok", runs=len(ok), wall_s=med([r["wall_s"] for r in ok]),
                   mb_per_s=med([r["mb_per_s"] for r in ok]),
                   tokens_per_s=med([r["tokens"] / r["wall_s"] for r in ok]), cpu_s=med([r["cpu_s"] for r in ok]),
                   peak_tree_rss_mib=med([r["peak_tree_rss_mib"] for r in ok]),
                   peak_tree_pss_mib=med([r["peak_tree_pss_mib"] or 0 for r in ok]) or None,
                   max_rss_largest_process_mib=med([r["max_rss_largest_process_mib"] for r in ok]),
                   tokens=ok[0]["tokens"])
        if "encode_s" in ok[0]:
            row["encode_mb_per_s"] = med([r["text_bytes"] / MB / r["encode_s"] for r in ok])
        rows.append(row)
    return rows


def ratios(rows: list[dict], n: int) -> list[dict]:
    """keizoku's MB/s over each other tool's, per tokenizer and corpus (medians; per MB, so inputs may differ)."""
    by = {(r["phase"], r["tokenizer"], r["corpus"], r["range"], r["format"], r["tool"], r.get("mode"), r["workers"]): r
          for r in rows if r["status"] == "ok"}
    pairs = [  # (what, keizoku row, other row)
        ("vs preprocess_data.py, N workers, same slice", ("slice", "jsonl", "keizoku", None, n),
         ("slice", "jsonl", "megatron", None, n)),
        ("vs preprocess_data.py, 1 worker, same slice", ("w1slice", "jsonl", "keizoku", None, 1),
         ("w1slice", "jsonl", "megatron", None, 1)),
        ("vs preprocess_data_fast.py, N threads, whole corpus", ("full", "jsonl", "keizoku", None, n),
         ("full", "jsonl", "megatron_fast", None, n)),
        ("vs preprocess_data_fast.py, .gz, whole corpus", ("full", "gz", "keizoku", None, n),
         ("full", "gz", "megatron_fast", None, n)),
        ("vs raw HF encode_batch, N threads, same slice", ("slice", "jsonl", "keizoku", None, n),
         ("slice", "jsonl", "raw_hf", None, n)),
        ("vs raw gigatoken encode_batch, N threads, same slice", ("slice", "jsonl", "keizoku", None, n),
         ("slice", "jsonl", "raw_gigatoken", "batch", n)),
        ("vs raw gigatoken encode_files, N threads, whole corpus", ("full", "jsonl", "keizoku", None, n),
         ("full", "jsonl", "raw_gigatoken", "files", n)),
        ("N workers vs 1 (keizoku, slice)", ("slice", "jsonl", "keizoku", None, n),
         ("slice", "jsonl", "keizoku", None, 1)),
        (".gz vs .jsonl (keizoku, N workers, whole corpus)", ("full", "gz", "keizoku", None, n),
         ("full", "jsonl", "keizoku", None, n)),
    ]
    out = []
    for tok in sorted({r["tokenizer"] for r in rows}):
        for corpus in sorted({r["corpus"] for r in rows if r["phase"] == "main"}):
            for what, k, o in pairs:
                if n == 1 and k == o:
                    continue
                kr, orow = by.get(("main", tok, corpus, *k)), by.get(("main", tok, corpus, *o))
                if kr and orow:
                    out.append({"tokenizer": tok, "corpus": corpus, "what": what,
                                "keizoku_mb_per_s": kr["mb_per_s"], "other_mb_per_s": orow["mb_per_s"],
                                "ratio": kr["mb_per_s"] / orow["mb_per_s"]})
    return out


def identity(runs: list[dict]) -> list[dict]:
    """Datasets made from the same text (same tokenizer, corpus, range; any tool, workers, format) grouped by
    their .bin/.idx digests; and whether the raw tools' token counts agree with them."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        if r["status"] == "ok" and r["phase"] != "warmup":
            groups.setdefault((r["phase"], r["tokenizer"], r["corpus"], r["range"]), []).append(r)
    out = []
    for key, group in groups.items():
        datasets = [r for r in group if r["tool"] in DATASET_TOOLS]
        digests: dict[tuple, list[str]] = {}
        for r in datasets:
            digests.setdefault((r["bin_sha256"], r["idx_sha256"]), []).append(
                f"{r['tool']} w{r['workers']} {r['format']} r{r['repeat']}")
        tokens = {f"{r['tool']}{'/' + r['mode'] if r.get('mode') else ''} {r['format']}": r["tokens"] for r in group}
        keizoku = {d for d, who in digests.items() if any(w.startswith("keizoku ") for w in who)}
        megatron = {d for d, who in digests.items() if any(w.startswith("megatron ") for w in who)}
        out.append({"phase": key[0], "tokenizer": key[1], "corpus": key[2], "range": key[3],
                    "identical": len(digests) <= 1, "variants": [sorted(w) for w in digests.values()],
                    "keizoku_consistent": len(keizoku) <= 1,
                    "keizoku_matches_preprocess_data": (keizoku == megatron) if keizoku and megatron else None,
                    "token_counts_agree": len(set(tokens.values())) <= 1, "token_counts": tokens})
    return out


def fmt(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def print_report(bench: Bench, rows, speedups, checks) -> None:
    m, a = bench.machine, bench.args
    print("# keizoku tokenize: side-by-side benchmark\n")
    print(f"- CPU: {m['cpu']}; nproc {m['nproc']}, usable cores {m['usable_cores']}; memory "
          f"{fmt(m['memory_gib'], '.1f')} GiB; Python {m['python']}; {m['platform']}")
    print("- " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()))
    print(f"- keizoku decompressors: {m['keizoku_decompressors']}; C extensions: {m['keizoku_c_extensions']}")
    for name, t in (("preprocess_data.py", bench.megatron), ("preprocess_data_fast.py", bench.megatron_fast)):
        if t:
            print(f"- {name}: Megatron-LM {fmt(t['commit'], '.12')} ({t['source']})")
    for r in bench.runs:
        if r["phase"] == "warmup" and r["status"] == "ok":
            print(f"- keizoku's first run with {r['tokenizer']} (prepares and caches its tables; untimed below): "
                  f"{r['wall_s']:.1f} s")
    print(f"- N = {a.workers} workers; {a.repeats} run(s) of each, interleaved; corpora:")
    for name, c in bench.corpora.items():
        print(f"  - {name}: {c['bytes'] / MB:,.1f} MB, {c['docs']:,} documents"
              + (f", .gz {c['gz_bytes'] / MB:,.1f} MB" if "gz_bytes" in c else ""))
    print("\n## Runs (medians)\n")
    print("| phase | tokenizer | corpus | text | format | tool | workers | wall s | MB/s | tokens/s | CPU s "
          "| peak RSS tree (MiB) | peak PSS tree (MiB) | max RSS largest (MiB) |")
    print("|---|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        label = TOOL_LABELS[r["tool"]] + (f" ({r['mode']})" if r.get("mode") else "")
        head = (f"| {r['phase']} | {r['tokenizer']} | {r['corpus']} | {r['range']} {r['text_mb']:.0f} MB "
                f"| {r['format']} | {label} | {r['workers']} ")
        if r["status"] != "ok":
            print(head + f"| {r['status']}: {r.get('message', '')[:150].replace('|', '/')} | | | | | | |")
            continue
        print(head + f"| {r['wall_s']:.2f} | {r['mb_per_s']:.1f} | {r['tokens_per_s']:,.0f} | {r['cpu_s']:.1f} "
              f"| {r['peak_tree_rss_mib']:,.0f} | {fmt(r['peak_tree_pss_mib'], ',.0f')} "
              f"| {r['max_rss_largest_process_mib']:,.0f} |")
    if speedups:
        print("\n## keizoku's speed over the others (MB/s ratio of medians)\n")
        print("| tokenizer | corpus | comparison | keizoku MB/s | other MB/s | ratio |")
        print("|---|---|---|---:|---:|---:|")
        for s in speedups:
            print(f"| {s['tokenizer']} | {s['corpus']} | {s['what']} | {s['keizoku_mb_per_s']:.1f} "
                  f"| {s['other_mb_per_s']:.1f} | {s['ratio']:.2f}× |")
    print("\n## Checks\n")
    for c in checks:
        what = "identical" if c["identical"] else "DIFFERENT: " + " / ".join(", ".join(v) for v in c["variants"])
        print(f"- {c['phase']} {c['tokenizer']} {c['corpus']} {c['range']}: datasets {what}"
              f"; token counts {'agree' if c['token_counts_agree'] else 'DIFFER: ' + str(c['token_counts'])}")


# --------------------------------------------------------------------------- main


def main() -> int:
    args = parse_args()
    # stopped by timeout(1) or a job's limit: raise here, so that the run in flight is killed (measure) and the
    # JSON keeps what was measured
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    own_workdir = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="keizoku-bench-")) if own_workdir else args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    log(f"workdir: {workdir}")
    bad = False
    try:
        bench = Bench(args, workdir, machine_info())
        stopped = None
        try:
            bench.warm_up()
            if "main" in args.phases:
                bench.main_phase()
            if "memory" in args.phases and args.memory_gb > 0:
                bench.memory_phase()
        except SystemExit as e:  # SIGTERM (a time limit): report what was measured
            stopped = e.code
            log(f"stopped ({e.code}): reporting the runs measured so far")
        rows = summarize(bench.runs)
        speedups = ratios(rows, args.workers)
        checks = identity(bench.runs)
        print_report(bench, rows, speedups, checks)
        bad = any(not c["keizoku_consistent"] or c["keizoku_matches_preprocess_data"] is False for c in checks)
        failed = [r for r in bench.runs if r["status"] == "failed"]
        bench.save({"medians": rows, "speed_ratios": speedups, "checks": checks,
                    "keizoku_identical_to_preprocess_data": not bad, "failed_runs": len(failed),
                    "stopped": stopped, "seconds": time.perf_counter() - bench.started})
        if args.json:
            log(f"raw results: {args.json}")
        if failed:
            log(f"{len(failed)} run(s) failed: {', '.join(r['tool'] for r in failed)} (see the JSON)")
            bad = bad or any(r["tool"] == "keizoku" for r in failed)
    finally:
        if own_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    if bad:
        log("FAIL: a keizoku dataset differs from preprocess_data.py's or another keizoku run's, or keizoku failed")
        return 1
    return 0 if stopped is None else 128 + signal.SIGTERM


if __name__ == "__main__":
    sys.exit(main())
