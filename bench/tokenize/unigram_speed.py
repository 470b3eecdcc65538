"""keizoku._unigram against Hugging Face ``tokenizers`` on one core: MB of UTF-8 text per CPU-second.

Both encode the same documents in the same process, one after the other: tokenizers' ``encode_batch(texts,
add_special_tokens=False)`` with RAYON_NUM_THREADS=1 (one thread), and keizoku's C encoder's ``encode_pack``
(what ``keizoku tokenize`` calls; the documents it hands back go through tokenizers, inside the measurement).
CPU seconds are ``time.process_time`` (the whole process, every thread), the best of ``--repeats`` runs that
alternate between the two, each on fresh copies of the strings (so each pays for their UTF-8 conversion). The ids
must be equal, document by document; the script exits 1 otherwise.

Texts: the documents of ``--data`` as they are ("as is"), and a variant with no repeated sentences ("no
repeats": a random ASCII letter before each 、 and 。, fixed seed), so that no cache of repeated text can help
either side; ``--also`` adds more JSONL files (the English sample by default).

    .venv/bin/python bench/tokenize/unigram_speed.py [--tokenizer DIR] [--data JSONL.GZ] [--repeats 5]
"""

from __future__ import annotations

import os

os.environ["RAYON_NUM_THREADS"] = "1"  # before tokenizers starts its thread pool
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import gzip  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

from keizoku.data import unigram  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared"


def read_texts(path: Path) -> list[str]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def no_repeats(texts: list[str], seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
    return [re.sub("[、。]", lambda m: rng.choice(letters) + m.group(0), t) for t in texts]


def fresh(texts: list[str]) -> list[str]:
    """New str objects: CPython caches a str's UTF-8 once asked for it, and both encoders ask; a fresh copy makes
    each run pay for that conversion, as tokenizing text just read does."""
    return [(t + ".")[:-1] for t in texts]


def cpu_seconds(fns: list, texts: list[str], repeats: int) -> list[float]:
    """The best CPU seconds of each of ``fns`` on ``texts``; runs alternate, so that both meet the same machine
    (a shared VM's speed drifts)."""
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            batch = fresh(texts)
            t0 = time.process_time()
            fn(batch)
            best[i] = min(best[i], time.process_time() - t0)
    return best


def measure(name: str, texts: list[str], hf: Tokenizer, enc: unigram.UnigramEncoder, repeats: int) -> dict:
    mb = sum(len(t.encode()) for t in texts) / 1e6
    ref = [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)]
    ids, lengths = enc.encode_pack(texts, None, None)
    flat, lengths = np.frombuffer(ids, dtype=np.uint32), np.frombuffer(lengths, dtype=np.int32)
    ours = np.split(flat, np.cumsum(lengths)[:-1]) if len(texts) else []
    bad = [i for i, (a, b) in enumerate(zip(ours, ref)) if a.tolist() != b]
    if bad or len(ours) != len(ref):
        print(f"{name}: ids differ from Hugging Face in {len(bad)} documents, first {bad[:5]}", file=sys.stderr)
        sys.exit(1)
    enc.fallback.documents = 0
    hf_s, c_s = cpu_seconds([lambda batch: hf.encode_batch(batch, add_special_tokens=False),
                             lambda batch: enc.encode_pack(batch, None, None)], texts, repeats)
    return {"text": name, "docs": len(texts), "mb": mb, "tokens": int(flat.size), "hf": mb / hf_s, "c": mb / c_s,
            "speedup": hf_s / c_s, "fallback_docs": enc.fallback.documents // repeats}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer", type=Path, default=SHARED / "tokenizers" / "llm-jp-3")
    ap.add_argument("--data", type=Path, default=SHARED / "data" / "ja_sample.jsonl.gz")
    ap.add_argument("--also", type=Path, nargs="*", default=[SHARED / "data" / "en_sample.jsonl.gz"])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    path = args.tokenizer / "tokenizer.json" if args.tokenizer.is_dir() else args.tokenizer
    text = path.read_text(encoding="utf-8")
    spec, note = unigram.unigram_spec(json.loads(text))
    if spec is None:
        print(f"{path}: {note}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    c = unigram.build_encoder(spec)
    build_s = time.perf_counter() - t0
    if c is None:
        print("keizoku._unigram is not built: pip install -e . --no-build-isolation", file=sys.stderr)
        return 2
    hf = Tokenizer.from_str(text)
    enc = unigram.UnigramEncoder(c, lambda: hf)

    texts = read_texts(args.data)
    rows = [measure(f"{args.data.name} (as is)", texts, hf, enc, args.repeats),
            measure(f"{args.data.name} (no repeats)", no_repeats(texts), hf, enc, args.repeats)]
    rows += [measure(p.name, read_texts(p), hf, enc, args.repeats) for p in args.also if p.exists()]

    import tokenizers

    print(f"tokenizer {path} ({len(spec['pieces']):,} pieces; C encoder built in {build_s * 1e3:.0f} ms); "
          f"tokenizers {tokenizers.__version__}, RAYON_NUM_THREADS=1; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs; best of {args.repeats}; ids equal to Hugging Face on every document\n")
    print("| text | docs | MB | tokens | HF MB/CPU-s | keizoku._unigram MB/CPU-s | speed-up | docs to fallback |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['text']} | {r['docs']} | {r['mb']:.2f} | {r['tokens']:,} | {r['hf']:.2f} | {r['c']:.1f} | "
              f"{r['speedup']:.1f}× | {r['fallback_docs']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
