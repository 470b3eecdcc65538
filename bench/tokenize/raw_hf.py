"""The Hugging Face ceiling: tokenize a JSONL corpus with a bare ``tokenizers`` ``encode_batch`` loop.

Part of bench/tokenize/bench.py. This is what any tool built on Hugging Face's Rust tokenizer can at best
reach: no output is written, no ids are converted to numpy, there is no process pool. Lines are read and
``json.loads``-ed in the main thread; each batch of ``--batch-size`` documents is encoded by
``Tokenizer.encode_batch(texts, add_special_tokens=False)``, which tokenizes the batch in parallel on
tokenizers' own (Rayon) thread pool. The number of threads is set by the environment variable
``RAYON_NUM_THREADS``, read once when the pool starts; bench.py sets it to the worker count (and
``TOKENIZERS_PARALLELISM=true``).

Prints one JSON object on stdout: documents (all, and those with at least one token: the ones Megatron
gives an EOD), tokens (without EOD), bytes read, and the seconds spent loading the tokenizer, reading +
parsing + encoding, encoding alone, and in total (from just after the imports).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from tokenizers import Tokenizer


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("corpus", type=Path, help="JSONL file with a 'text' field per line.")
    p.add_argument("--tokenizer", type=Path, required=True, help="Directory holding tokenizer.json.")
    p.add_argument("--batch-size", type=int, default=1000, help="Documents per encode_batch call.")
    p.add_argument("--key", default="text", help="JSON field holding the text.")
    return p.parse_args()


def read_batches(path: Path, key: str, batch_size: int):
    """Yield (texts, bytes) for successive batches of ``batch_size`` lines."""
    texts: list[str] = []
    nbytes = 0
    with open(path, "rb") as f:
        for line in f:
            nbytes += len(line)
            texts.append(json.loads(line)[key])
            if len(texts) == batch_size:
                yield texts, nbytes
                texts, nbytes = [], 0
    if texts:
        yield texts, nbytes


def main() -> None:
    args = parse_args()
    t0 = time.perf_counter()
    tokenizer = Tokenizer.from_file(str(args.tokenizer / "tokenizer.json"))
    t_loaded = time.perf_counter()

    docs = nonempty_docs = tokens = nbytes = 0
    encode_s = 0.0
    batches = read_batches(args.corpus, args.key, args.batch_size)
    for texts, batch_bytes in batches:
        t = time.perf_counter()
        encodings = tokenizer.encode_batch(texts, add_special_tokens=False)
        encode_s += time.perf_counter() - t
        docs += len(texts)
        lengths = [len(e) for e in encodings]
        tokens += sum(lengths)
        nonempty_docs += sum(1 for n in lengths if n)
        nbytes += batch_bytes
    t_end = time.perf_counter()

    print(json.dumps({
        "docs": docs,
        "nonempty_docs": nonempty_docs,
        "tokens": tokens,
        "bytes": nbytes,
        "rayon_threads": os.environ.get("RAYON_NUM_THREADS"),
        "load_s": t_loaded - t0,
        "read_encode_s": t_end - t_loaded,
        "encode_s": encode_s,
        "total_s": t_end - t0,
    }))


if __name__ == "__main__":
    main()
