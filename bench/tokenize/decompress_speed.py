"""How fast can the main process of ``keizoku tokenize`` get the text out of a ``.jsonl.gz`` / ``.jsonl.zst``?

Decompresses each given file with every available method, a few times, on one thread, and prints MB/s of
*output* (1 MB = 1e6 bytes): wall and CPU seconds of the best run. The ``keizoku`` rows are what
``keizoku.data.readers`` does — ``gunzip``/``unzstd`` on this thread, and ``decompressed`` (the same on its
decompressing thread, handed over in 1 MiB blocks): the choice this table was made for; the others are the
candidates it was chosen from:

gzip: the ``gzip`` module (``GzipFile.read`` of 64 KiB: keizoku before, and of 1 MiB), ``zlib.decompressobj``
fed big reads of the file, python-isal (``isal.igzip.GzipFile``, ``isal.isal_zlib.decompressobj``,
``isal.igzip_threaded``: decompression on a thread of its own), python-zlib-ng (``zlib_ng.gzip_ng.GzipFile``,
``zlib_ng.zlib_ng.decompressobj``). zstd: ``zstandard``'s ``decompressobj`` with different read and write
sizes. Every method's output is checked against the first method's (SHA-256, outside the timing).

    .venv/bin/python bench/tokenize/decompress_speed.py FILE.jsonl.gz FILE.jsonl.zst ... [--repeats 3] [--json OUT]

Missing libraries are skipped (and said so). ``--make DIR`` first writes test files from a JSONL sample (default
../shared/data/ja_sample.jsonl.gz): ``DIR/ja.jsonl`` (the sample's lines, shuffled, repeated to ``--make-mb`` MB),
``DIR/ja.jsonl.gz`` (gzip level 6, one member per 16 MiB) and ``DIR/ja.jsonl.zst`` (zstd level 3 with a 1 MiB window,
shorter than the sample, one frame per 16 MiB), compressed in parallel, and measures those.

``--overlap`` measures instead whether decompressing on a thread of its own pays, on a machine with idle cores:
(1) keizoku's decompression on one thread, then on two threads at once (each the whole file): if the library
lets go of the GIL, two take about as long as one; (2) keizoku's reader (``open_reader``: decompression, line
chunking, SHA-256) iterated with its decompressing thread and without (decompressing in the reading thread), alone
and with a stand-in for the rest of the main process's work per chunk (pickling the chunk as a submit does, and
writing 4 bytes per text byte as the ids' write does, both to /dev/null): wall MB/s, and the CPU seconds of the
reading thread, which is what bounds the main process when cores are free.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import platform
import sys
import time
import zlib
from pathlib import Path

MB = 1e6


def _gzipfile(module, size):
    def run(f):
        g = module.GzipFile(fileobj=f, mode="rb")
        while block := g.read(size):
            yield block
    return run


def _objects(make, raw_size):
    """A decompressobj per gzip member or zstd frame (``make()``), fed ``raw_size`` reads of the file; a new one at
    each ``eof``, given the ``unused_data``."""
    def run(f):
        d = make()
        while raw := f.read(raw_size):
            while raw:
                out = d.decompress(raw)
                if out:
                    yield out
                if d.eof:
                    raw = d.unused_data
                    d = make()
                else:
                    raw = b""
    return run


def _deflate_obj(zmod, raw_size):
    return _objects(lambda: zmod.decompressobj(31), raw_size)


def _isal_threaded(size):
    def run(f):
        from isal import igzip_threaded

        g = igzip_threaded.open(f, "rb", threads=1, block_size=1 << 20)
        while block := g.read(size):
            yield block
    return run


def _zstd_obj(raw_size, write_size=None):
    import zstandard

    dctx = zstandard.ZstdDecompressor()
    return _objects((lambda: dctx.decompressobj(write_size=write_size)) if write_size else dctx.decompressobj,
                    raw_size)


def _keizoku(kind):
    def run(f):
        from keizoku.data import readers

        cls = readers.GzipJsonlReader if kind == "gz" else readers.ZstdJsonlReader
        return cls(Path("x"), ()).decompressed(f)
    return run


def _keizoku_inline(kind):
    def run(f):
        from keizoku.data import readers

        return readers.gunzip(f) if kind == "gz" else readers.unzstd(f)
    return run


def methods(kind: str) -> list[tuple[str, object]]:
    out = []
    if kind == "gz":
        out += [("gzip.GzipFile read 64 KiB", _gzipfile(gzip, 1 << 16)),
                ("gzip.GzipFile read 1 MiB", _gzipfile(gzip, 1 << 20)),
                ("zlib.decompressobj, 1 MiB reads", _deflate_obj(zlib, 1 << 20)),
                ("zlib.decompressobj, 4 MiB reads", _deflate_obj(zlib, 4 << 20))]
        try:
            from isal import igzip, isal_zlib
            out += [("isal igzip.GzipFile read 64 KiB", _gzipfile(igzip, 1 << 16)),
                    ("isal igzip.GzipFile read 1 MiB", _gzipfile(igzip, 1 << 20)),
                    ("isal isal_zlib.decompressobj, 256 KiB reads", _deflate_obj(isal_zlib, 1 << 18)),
                    ("isal isal_zlib.decompressobj, 1 MiB reads", _deflate_obj(isal_zlib, 1 << 20)),
                    ("isal isal_zlib.decompressobj, 4 MiB reads", _deflate_obj(isal_zlib, 4 << 20)),
                    ("isal igzip_threaded (1 thread) read 1 MiB", _isal_threaded(1 << 20))]
        except ImportError:
            print("python-isal not installed: skipped", file=sys.stderr)
        try:
            from zlib_ng import gzip_ng, zlib_ng
            out += [("zlib-ng gzip_ng.GzipFile read 1 MiB", _gzipfile(gzip_ng, 1 << 20)),
                    ("zlib-ng zlib_ng.decompressobj, 1 MiB reads", _deflate_obj(zlib_ng, 1 << 20))]
        except ImportError:
            print("zlib-ng not installed: skipped", file=sys.stderr)
    else:
        out += [("zstandard decompressobj, 128 KiB reads", _zstd_obj(1 << 17)),
                ("zstandard decompressobj, 1 MiB reads", _zstd_obj(1 << 20)),
                ("zstandard decompressobj, 4 MiB reads", _zstd_obj(4 << 20)),
                ("zstandard decompressobj, 1 MiB reads, write_size 1 MiB", _zstd_obj(1 << 20, 1 << 20)),
                ("zstandard decompressobj, 4 MiB reads, write_size 4 MiB", _zstd_obj(4 << 20, 4 << 20))]
    try:
        import keizoku.data.readers as r
    except ImportError:
        return out
    name = r.decompressor("gzip" if kind == "gz" else "zstd")
    out += [(f"keizoku {name}, this thread", _keizoku_inline(kind)),
            (f"keizoku {name}, its decompressing thread", _keizoku(kind))]
    return out


def measure(path: Path, run, repeats: int) -> dict:
    best = None
    digest = None
    for i in range(repeats):
        with open(path, "rb", buffering=0) as f:
            w0, c0 = time.perf_counter(), time.process_time()
            n = 0
            for block in run(f):
                n += len(block)
            wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        if best is None or wall < best["wall_s"]:
            best = {"wall_s": wall, "cpu_s": cpu, "bytes": n}
    with open(path, "rb", buffering=0) as f:  # the check, untimed
        h = hashlib.sha256()
        for block in run(f):
            h.update(block)
        digest = h.hexdigest()
    return {**best, "mb_per_s": best["bytes"] / MB / best["wall_s"], "sha256": digest}


def _two_at_once(path: Path, run) -> tuple[float, float]:
    import threading

    def once():
        with open(path, "rb", buffering=0) as f:
            for _ in run(f):
                pass

    t = time.perf_counter()
    once()
    one = time.perf_counter() - t
    threads = [threading.Thread(target=once) for _ in range(2)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return one, time.perf_counter() - t


def _read_chunks(path: Path, thread: bool, work: bool) -> dict:
    import pickle

    from keizoku.data import readers

    background = readers.in_background
    if not thread:
        readers.in_background = lambda blocks, *a, **k: blocks
    try:
        t, main0, all0 = time.perf_counter(), time.thread_time(), time.process_time()
        n = 0
        reader = readers.open_reader(path, ["text"])
        with open(os.devnull, "wb") as null:
            for chunk in reader:
                n += len(chunk.data)
                if work:
                    null.write(pickle.dumps(chunk, protocol=pickle.HIGHEST_PROTOCOL))
                    null.write(bytes(4 * len(chunk.data)))
        _ = reader.sha256  # the hashing thread caught up, as at the end of a real read
        wall, main, all_ = time.perf_counter() - t, time.thread_time() - main0, time.process_time() - all0
    finally:
        readers.in_background = background
    return {"thread": thread, "work": work, "bytes": n, "wall_s": wall, "mb_per_s": n / MB / wall,
            "reading_thread_cpu_s": main, "all_threads_cpu_s": all_}


def overlap(files: list[Path], repeats: int) -> list[dict]:
    results = []
    for path in files:
        kind = "zst" if path.name.endswith((".zst", ".zstd")) else "gz"
        one, two = _two_at_once(path, _keizoku_inline(kind))
        print(f"\n## {path.name}\n\n- one thread {one:.2f} s; two threads at once, each the whole file, {two:.2f} s "
              f"({two / one:.2f}x: 1 = the library lets go of the GIL, 2 = it does not)\n")
        results.append({"file": str(path), "one_thread_s": one, "two_threads_s": two})
        print("| reader | main-process stand-in | MB/s (wall) | reading thread CPU s | all threads CPU s |")
        print("|---|---|---:|---:|---:|")
        for work in (False, True):
            for thread in (False, True):
                runs = [_read_chunks(path, thread, work) for _ in range(repeats)]
                r = min(runs, key=lambda x: x["wall_s"])
                print(f"| {'decompressing thread' if thread else 'inline'} | {'yes' if work else 'no'} "
                      f"| {r['mb_per_s']:.0f} | {r['reading_thread_cpu_s']:.2f} | {r['all_threads_cpu_s']:.2f} |",
                      flush=True)
                results.append({"file": str(path), **r, "runs": runs})
    return results


def make_files(out: Path, sample: Path, mb: float) -> list[Path]:
    import concurrent.futures
    import random

    import zstandard

    out.mkdir(parents=True, exist_ok=True)
    text = out / "ja.jsonl"
    with gzip.open(sample, "rb") as f:
        lines = f.read().splitlines(keepends=True)
    rng, written = random.Random(0), 0
    with open(text, "wb") as f:
        while written < mb * MB:
            rng.shuffle(lines)
            block = b"".join(lines)
            f.write(block)
            written += len(block)
    block = 16 << 20
    cores = len(os.sched_getaffinity(0))
    # a window (1 MiB) shorter than the sample (1.25 MB), or zstd would find the whole repeats: a ratio no real
    # corpus has
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=20)
    makers = {".gz": lambda d: gzip.compress(d, 6, mtime=0),
              ".zst": lambda d: zstandard.ZstdCompressor(compression_params=params).compress(d)}  # not thread-safe
    paths = []
    for suffix, compress in makers.items():
        path = text.with_name(text.name + suffix)
        with open(text, "rb") as f, open(path, "wb") as o, concurrent.futures.ThreadPoolExecutor(cores) as pool:
            for part in pool.map(compress, iter(lambda: f.read(block), b"")):
                o.write(part)
        paths.append(path)
    return paths


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="*", type=Path)
    p.add_argument("--make", type=Path, help="Write the test files into this directory first, and measure them.")
    p.add_argument("--make-mb", type=float, default=300.0, help="Size of the text of --make's files (MB).")
    p.add_argument("--sample", type=Path, default=Path(__file__).resolve().parents[3] / "shared" / "data"
                   / "ja_sample.jsonl.gz", help="What --make repeats.")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path)
    p.add_argument("--overlap", action="store_true", help="Measure the decompressing thread (see above).")
    args = p.parse_args()
    if args.make:
        args.files += make_files(args.make, args.sample, args.make_mb)
    if not args.files:
        p.error("no files: give some, or --make DIR")
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    versions = {}
    for mod in ("isal", "zlib_ng", "zstandard"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            versions[mod] = None
    versions["zlib"] = zlib.ZLIB_RUNTIME_VERSION
    machine = {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "python": sys.version.split()[0],
               "platform": platform.platform(), "versions": versions}
    print(f"# decompression, one thread; {cpu}, {machine['cores']} cores, Python {machine['python']}, "
          + ", ".join(f"{k} {v}" for k, v in versions.items()))
    if args.overlap:
        results = overlap(args.files, args.repeats)
        if args.json:
            args.json.write_text(json.dumps({"machine": machine, "mode": "overlap", "repeats": args.repeats,
                                             "results": results}, indent=2) + "\n")
        return 0
    results = []
    ok = True
    for path in args.files:
        kind = "zst" if path.name.endswith((".zst", ".zstd")) else "gz"
        size = path.stat().st_size
        print(f"\n## {path.name}: {size / MB:.1f} MB on disk\n")
        print("| method | MB/s (output) | wall s | CPU s |")
        print("|---|---:|---:|---:|")
        ref = None
        for name, run in methods(kind):
            r = measure(path, run, args.repeats)
            ref = ref or r["sha256"]
            same = r["sha256"] == ref
            ok &= same
            print(f"| {name} | {r['mb_per_s']:.0f} | {r['wall_s']:.2f} | {r['cpu_s']:.2f} |"
                  + ("" if same else " **OUTPUT DIFFERS**"), flush=True)
            results.append({"file": str(path), "disk_bytes": size, "method": name, **r, "same_output": same})
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "repeats": args.repeats, "results": results},
                                        indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
