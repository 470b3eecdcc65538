"""The machine's own scaling for keizoku's C BPE encoder: the same texts encoded by N forked processes at once,
sharing nothing (no pipes, no files), against one. What a tokenizer of many worker processes can reach here.

    python3 bench/tokenize/core_scaling.py CORPUS.jsonl TOKENIZER_DIR 1 8 16
"""

import itertools
import json
import os
import sys
import time

from keizoku.data.tokenizer import TextEncoder, prepare


def main() -> None:
    corpus, tokenizer, counts = sys.argv[1], sys.argv[2], [int(x) for x in sys.argv[3:]]
    enc = TextEncoder(prepare(tokenizer).spec)
    texts = [json.loads(line)["text"] for line in itertools.islice(open(corpus, encoding="utf-8"), 12000)]
    mb = sum(len(t.encode()) for t in texts) / 1e6
    print(f"{mb:.1f} MB of text, {os.cpu_count()} CPUs", flush=True)
    for n in counts:
        r, w = os.pipe()
        start, pids = time.perf_counter(), []
        for _ in range(n):
            pid = os.fork()
            if pid == 0:
                cpu = time.process_time()
                enc._c.encode_pack(texts, -1, -1, enc._encode_tiktoken)
                os.write(w, f"{time.process_time() - cpu}\n".encode())
                os._exit(0)
            pids.append(pid)
        for pid in pids:
            os.waitpid(pid, 0)
        wall = time.perf_counter() - start
        cpus = [float(x) for x in os.read(r, 1 << 16).decode().split()]
        print(json.dumps({"processes": n, "wall_s": round(wall, 2), "aggregate_MB_s": round(n * mb / wall, 1),
                          "MB_per_cpu_s_each": round(mb / (sum(cpus) / n), 1)}), flush=True)


if __name__ == "__main__":
    main()
