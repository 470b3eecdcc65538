"""gigatoken's raw encode of a JSONL corpus: what the fastest tokenizer library does with no dataset to write.

Part of bench/tokenize/bench.py, gigatoken's counterpart of ``raw_hf.py``. Loads ``gigatoken.Tokenizer(DIR)``
(DIR holding a Hugging Face tokenizer.json) and encodes the corpus on gigatoken's own (Rayon) thread pool, whose
size the environment variable ``RAYON_NUM_THREADS`` sets (bench.py: the worker count). Nothing is written and the
ids are only counted. Two modes:

- ``files`` (default): ``Tokenizer.encode_files(JsonlFileSource([CORPUS], field=KEY))`` — gigatoken reads the
  file (plain or .gz), parses the JSON and encodes in Rust, all ids of the file held in memory at the end: what
  Megatron-LM's ``tools/preprocess_data_fast.py`` calls.
- ``batch``: as ``raw_hf.py`` does: lines read and ``json.loads``-ed in the main thread, ``encode_batch`` on
  batches of ``--batch-size`` documents (ids of one batch at a time).

Prints one JSON object on stdout: documents (all, and those with at least one token: the ones Megatron gives an
EOD), tokens (without EOD), the seconds spent loading the tokenizer, encoding (``files``: everything after loading;
``batch``: the encode calls alone) and in total, and this process's peak RSS (``ru_maxrss``). A tokenizer
gigatoken cannot load (e.g. a Unigram one) makes it print ``{"refused": MESSAGE}`` and exit 3.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import sys
import time
from pathlib import Path


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("corpus", type=Path, help="JSONL file (.jsonl or .jsonl.gz) with a 'text' field per line.")
    p.add_argument("--tokenizer", type=Path, required=True, help="Directory holding tokenizer.json.")
    p.add_argument("--mode", choices=("files", "batch"), default="files")
    p.add_argument("--batch-size", type=int, default=1000, help="Documents per encode_batch call (batch mode).")
    p.add_argument("--key", default="text", help="JSON field holding the text.")
    return p.parse_args()


def read_batches(path: Path, key: str, batch_size: int):
    texts: list[str] = []
    with (gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")) as f:
        for line in f:
            texts.append(json.loads(line)[key])
            if len(texts) == batch_size:
                yield texts
                texts = []
    if texts:
        yield texts


def main() -> int:
    args = parse_args()
    t0 = time.perf_counter()
    import gigatoken

    try:
        tokenizer = gigatoken.Tokenizer(str(args.tokenizer))
    except Exception as e:  # noqa: BLE001 - gigatoken raises RuntimeError/ValueError for what it cannot load
        print(json.dumps({"refused": f"{type(e).__name__}: {str(e).strip().splitlines()[0]}"}))
        return 3
    t_loaded = time.perf_counter()

    docs = nonempty = tokens = 0
    encode_s = 0.0
    if args.mode == "files":
        ids = tokenizer.encode_files(gigatoken.JsonlFileSource([str(args.corpus)], field=args.key))
        encode_s = time.perf_counter() - t_loaded
        lengths = [len(x) for x in ids]
        docs, tokens, nonempty = len(lengths), sum(lengths), sum(1 for n in lengths if n)
        del ids
    else:
        for texts in read_batches(args.corpus, args.key, args.batch_size):
            t = time.perf_counter()
            ids = tokenizer.encode_batch(texts)
            encode_s += time.perf_counter() - t
            lengths = [len(x) for x in ids]
            docs += len(lengths)
            tokens += sum(lengths)
            nonempty += sum(1 for n in lengths if n)
    t_end = time.perf_counter()
    print(json.dumps({
        "mode": args.mode,
        "docs": docs,
        "nonempty_docs": nonempty,
        "tokens": tokens,
        "rayon_threads": os.environ.get("RAYON_NUM_THREADS"),
        "gigatoken": getattr(gigatoken, "__version__", None) or _version("gigatoken"),
        "load_s": t_loaded - t0,
        "encode_s": encode_s,
        "total_s": t_end - t0,
        "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))
    return 0


def _version(dist: str) -> str | None:
    try:
        import importlib.metadata

        return importlib.metadata.version(dist)
    except Exception:  # noqa: BLE001
        return None


if __name__ == "__main__":
    sys.exit(main())
