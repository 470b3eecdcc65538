"""Where the compute stream waits, from a keizoku profile trace (``logging.profile_step``; ``bench_train.py
--profile --keep-trace`` copies rank 0's): its busy time, its largest idle gaps with the kernels on either side,
the host syncs (what the CPU was doing when it waited for the GPU), and each collective's kernel time and how long
after its launch on the CPU it started on the GPU.

    python3 bench/gpu/trace_gaps.py RUN_DIR/profile/rank0-step14.trace.json.gz [rank1-step14.trace.json.gz ...]

A gap before an all-gather copy-out is the compute stream waiting for a gather (or for the CPU to issue it); a
collective whose kernel runs much longer than the same collective elsewhere in the step is waiting for the other
ranks or sharing the SMs with compute, which costs nothing unless the compute stream waits too. The idle time by
100 ms of the step shows which phase (a forward, a backward, the optimizer) loses it. Given the
traces of several ranks of one step (``logging.profile_ranks``; the clocks of one host agree), it also says, per
collective, how much later than the first rank the last one started its kernel, and which rank was last most
often: a late rank makes the others' kernels long."""

from __future__ import annotations

import argparse
import collections
import gzip
import json

MATMUL = ("gemm", "nvjet", "xmma", "cutlass")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("traces", nargs="+", help="one rank's trace, or several ranks' of the same step")
    p.add_argument("--top", type=int, default=20, help="largest gaps to list")
    a = p.parse_args()
    collectives = []
    for k, trace in enumerate(a.traces):
        print(f"== #{k}: {trace}")
        collectives.append(summarise(trace, a.top))
    if len(collectives) > 1:
        skew(collectives)


def skew(collectives: list[dict[str, list[float]]]) -> None:
    print("== across ranks: per collective, the last rank's kernel start after the first's (median, max ms), and "
          "how often each trace was the last")
    for name in collectives[0]:
        starts = [c.get(name, []) for c in collectives]
        n = min(len(s) for s in starts)
        if not n:
            continue
        lags, last = [], [0] * len(starts)
        for i in range(n):
            column = [s[i] for s in starts]
            lags.append(max(column) - min(column))
            last[column.index(max(column))] += 1
        lags.sort()
        print(f"  {name[:60]:60} {n:5} {lags[n // 2] / 1e3:8.2f} {lags[-1] / 1e3:8.2f}  last: "
              + ", ".join(f"#{k} {c}" for k, c in enumerate(last)))


def summarise(trace: str, top: int) -> dict[str, list[float]]:
    """Prints one rank's compute-stream gaps and collectives; returns each collective's kernel start times."""
    events = json.loads(gzip.decompress(open(trace, "rb").read()))["traceEvents"]
    kernels = [e for e in events if e.get("cat") == "kernel"]
    t0 = min(e["ts"] for e in kernels)
    matmul = collections.Counter()
    for e in kernels:
        if any(k in e["name"].lower() for k in MATMUL):
            matmul[e["tid"]] += e["dur"]
    compute = matmul.most_common(1)[0][0]
    ks = sorted((e for e in kernels if e["tid"] == compute), key=lambda e: e["ts"])
    span = ks[-1]["ts"] + ks[-1]["dur"] - ks[0]["ts"]
    busy = sum(e["dur"] for e in ks)
    gaps = [(b["ts"] - a_["ts"] - a_["dur"], a_, b) for a_, b in zip(ks, ks[1:])]
    print(f"compute stream {compute}: {len(ks)} kernels, busy {busy / 1e3:.1f} ms of {span / 1e3:.1f} ms "
          f"({100 * (1 - busy / span):.1f}% idle)")
    by_phase = collections.Counter()
    for g, before, _ in gaps:
        by_phase[int((before["ts"] + before["dur"] - t0) / 1e5)] += max(g, 0)
    print("  idle ms by 100 ms of the step: " + " ".join(f"{by_phase[i] / 1e3:.0f}" for i in range(max(by_phase) + 1)))
    for g, before, after in sorted(gaps, key=lambda x: -x[0])[:top]:
        print(f"  {g / 1e3:7.2f} ms idle at {(before['ts'] + before['dur'] - t0) / 1e3:8.1f} ms  after "
              f"{before['name'][:50]}  before {after['name'][:50]}")
    # host syncs: the CPU waits for the GPU; afterwards the GPU waits for the CPU to queue work again
    syncs = [e for e in events if e.get("name") in ("cudaStreamSynchronize", "cudaDeviceSynchronize")
             and e.get("dur", 0) > 1000]
    ops = [e for e in events if e.get("cat") == "cpu_op" and e.get("ph") == "X"]
    print(f"host syncs over 1 ms: {len(syncs)}")
    for sync in syncs:
        callers = [e["name"] for e in ops if e["tid"] == sync["tid"] and e["ts"] <= sync["ts"]
                   and e["ts"] + e["dur"] >= sync["ts"] + sync["dur"]]
        print(f"  {(sync['ts'] - t0) / 1e3:8.1f} ms: CPU waits {sync['dur'] / 1e3:6.1f} ms in "
              f"{' > '.join(callers[:3]) or sync['name']}")
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    stats = collections.defaultdict(list)
    starts = collections.defaultdict(list)
    for e in sorted(kernels, key=lambda e: e["ts"]):
        if "nccl" in e["name"].lower():
            cpu = launches.get(e.get("args", {}).get("correlation"))
            stats[e["name"].split("(")[0]].append((e["dur"], e["ts"] - cpu["ts"] if cpu else float("nan")))
            starts[e["name"].split("(")[0]].append(e["ts"])
    print("collectives: kernel count, total ms, median ms, median ms from CPU launch to GPU start")
    for name, rows in sorted(stats.items(), key=lambda x: -sum(d for d, _ in x[1])):
        durs, lags = sorted(d for d, _ in rows), sorted(lag for _, lag in rows)
        print(f"  {name[:60]:60} {len(rows):5} {sum(durs) / 1e3:9.1f} {durs[len(durs) // 2] / 1e3:8.2f} "
              f"{lags[len(lags) // 2] / 1e3:8.2f}")
    return starts


if __name__ == "__main__":
    main()
