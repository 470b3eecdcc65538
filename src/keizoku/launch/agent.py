"""The per-node launcher: what ``torchrun --nnodes N --node-rank R --nproc-per-node P`` does with a static
rendezvous, plus what a batch job needs and torchrun's agent does not do.

Starts P training processes (``keizoku train``) with torch's variables (``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``GROUP_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``, ...); they meet
through torch.distributed's ``env://`` rendezvous (a TCPStore on the master). Then it watches them:

- **walltime warning** — SIGUSR1, SIGUSR2 or SIGTERM to this agent, or the driver's stop file appearing:
  each training process gets SIGUSR1 (finish the step, save, exit 3) and all the time it needs. torchrun's
  agent instead dies on SIGUSR1/SIGUSR2 (no handler) and gives SIGTERM'd workers 30 s before SIGKILL,
  which can cut a large checkpoint short.
- **a failed rank** (any exit other than 0 and 3, or a signal): the others get SIGTERM, then SIGKILL after
  ``--failure-grace`` seconds (a rank blocked in a collective with a dead peer never finishes its step);
  the agent exits non-zero, and so the driver stops the other nodes.
- **abort** — SIGINT, SIGHUP, or (``--watch-stdin``, under qrsh/ssh) end of stdin when the driver is gone:
  like a failure. The training processes also die with the agent (``PR_SET_PDEATHSIG``).

Exit status: 0 if every rank finished, 3 if they stopped after saving, otherwise the failed rank's status
(128 + signal number when killed). Standard library only, like the driver.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional

EXIT_OK, EXIT_PREEMPTED = 0, 3
GRACEFUL = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
ABORT = (signal.SIGINT, signal.SIGHUP)
RELAY_EVERY_S = 2.0  # repeat the stop signal: a rank still starting up ignores it (see _child_setup)


def log(msg: str) -> None:
    print(f"keizoku launch: {msg}", file=sys.stderr, flush=True)


def node_rank_of(hosts: List[str], env=os.environ, hostname: Optional[str] = None) -> int:
    """This node's index in the driver's host list: by Slurm's node name or this host's name."""
    names = [h.split(".", 1)[0] for h in hosts]
    me = env.get("SLURMD_NODENAME") or (hostname or socket.gethostname()).split(".", 1)[0]
    matches = [i for i, h in enumerate(names) if h == me]
    if len(matches) != 1:
        raise SystemExit(f"keizoku launch: cannot tell this node's rank: {me!r} appears {len(matches)} times "
                         f"in the host list {hosts}; pass --node-rank")
    return matches[0]


def _child_setup() -> None:  # runs in the child between fork and exec
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the agent
    # A warning that comes while the trainer is still importing must not kill it (SIGUSR1's default action):
    # ignored until the trainer installs its handler; the agent repeats the signal until the ranks exit.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


class Agent:
    def __init__(self, args: argparse.Namespace, node_rank: int):
        self.args, self.node_rank = args, node_rank
        self.procs: List[subprocess.Popen] = []
        self.stop_reason: Optional[str] = None
        self.abort_reason: Optional[str] = None
        self._wake = threading.Event()

    def worker_env(self, local_rank: int) -> Dict[str, str]:
        a = self.args
        env = dict(os.environ)
        env.update(kv.split("=", 1) for kv in a.env)
        world = a.nnodes * a.nproc_per_node
        rank = self.node_rank * a.nproc_per_node + local_rank
        env.update({
            "RANK": str(rank), "LOCAL_RANK": str(local_rank), "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(a.nproc_per_node), "GROUP_RANK": str(self.node_rank),
            "GROUP_WORLD_SIZE": str(a.nnodes), "ROLE_RANK": str(rank), "ROLE_WORLD_SIZE": str(world),
            "ROLE_NAME": "default", "MASTER_ADDR": a.master_addr, "MASTER_PORT": str(a.master_port),
            "TORCHELASTIC_RUN_ID": a.run_id, "KEIZOKU_JOB_ID": a.run_id,
        })
        if "OMP_NUM_THREADS" not in env and a.nproc_per_node > 1:
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // a.nproc_per_node))
        return env

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if signum in ABORT:
            self.abort_reason = self.abort_reason or f"{name} received"
        else:
            self.stop_reason = self.stop_reason or f"{name} received"
        self._wake.set()

    def _watch_stdin(self) -> None:
        try:
            while os.read(0, 4096):
                pass
        except OSError:
            pass
        self.abort_reason = self.abort_reason or "the launch driver is gone (end of stdin)"
        self._wake.set()

    def run(self) -> int:
        a = self.args
        for sig in GRACEFUL + ABORT:
            signal.signal(sig, self._on_signal)
        cmd = [sys.executable, "-m", "keizoku", "train", *a.train_args]
        for local in range(a.nproc_per_node):
            # own session: the scheduler's group signals must not reach DataLoader workers; we relay
            self.procs.append(subprocess.Popen(cmd, env=self.worker_env(local), cwd=a.workdir or None,
                                               start_new_session=True, preexec_fn=_child_setup,
                                               stdin=subprocess.DEVNULL))
        if a.watch_stdin:
            threading.Thread(target=self._watch_stdin, daemon=True).start()
        stopping, last_relay = False, 0.0
        while True:
            codes = [p.poll() for p in self.procs]
            done = all(c is not None for c in codes)
            if done and all(c in (EXIT_OK, EXIT_PREEMPTED) for c in codes):
                break
            if not done and not stopping and a.stop_file and os.path.exists(a.stop_file):
                self.stop_reason = self.stop_reason or "the driver's stop file"
            if self.stop_reason and not stopping:
                stopping = True
                log(f"node {self.node_rank}: {self.stop_reason}: telling the training processes to save and stop")
            if stopping and not done and time.monotonic() - last_relay > RELAY_EVERY_S:
                last_relay = time.monotonic()
                for p in self.procs:
                    if p.poll() is None:
                        os.kill(p.pid, signal.SIGUSR1)  # the process only, not its DataLoader workers
            failed = [(i, c) for i, c in enumerate(codes) if c not in (None, EXIT_OK, EXIT_PREEMPTED)]
            if failed or self.abort_reason:
                if failed:
                    i, code = failed[0]
                    rank = self.node_rank * a.nproc_per_node + i
                    what = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
                    log(f"node {self.node_rank}: rank {rank} (pid {self.procs[i].pid}) failed ({what}); "
                        f"stopping the other ranks")
                    self._terminate()
                    return 128 - code if code < 0 else code
                log(f"node {self.node_rank}: {self.abort_reason}; stopping the training processes")
                self._terminate()
                return 1
            self._wake.wait(0.2)
            self._wake.clear()
        codes = [p.returncode for p in self.procs]
        if all(c == EXIT_OK for c in codes):
            return EXIT_OK
        return EXIT_PREEMPTED  # only 0s and 3s are left here

    def _terminate(self) -> None:
        live = [p for p in self.procs if p.poll() is None]
        for p in live:
            _killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.args.failure_grace
        while time.monotonic() < deadline and any(p.poll() is None for p in live):
            time.sleep(0.1)
        for p in live:
            if p.poll() is None:
                _killpg(p.pid, signal.SIGKILL)
                p.wait()


def _killpg(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def parse(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m keizoku.launch.agent",
                                description="Per-node launcher started by `keizoku launch`.")
    p.add_argument("--nnodes", type=int, required=True)
    p.add_argument("--nproc-per-node", type=int, required=True)
    p.add_argument("--node-rank", type=int, default=None, help="default: this host's place in --hosts")
    p.add_argument("--master-addr", required=True)
    p.add_argument("--master-port", type=int, required=True)
    p.add_argument("--run-id", default="local")
    p.add_argument("--hosts", default="", help="comma-separated node list; node rank r runs on hosts[r]")
    p.add_argument("--stop-file", default="")
    p.add_argument("--failure-grace", type=float, default=30.0)
    p.add_argument("--workdir", default="")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--watch-stdin", action="store_true", help="abort when stdin ends (driver gone)")
    p.add_argument("train_args", nargs="+", help="-- CONFIG [overrides] for keizoku train")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse(argv)
    hosts = [h for h in args.hosts.split(",") if h]
    rank = args.node_rank if args.node_rank is not None else node_rank_of(hosts)
    if not 0 <= rank < args.nnodes:
        raise SystemExit(f"keizoku launch: node rank {rank} is outside 0..{args.nnodes - 1}")
    return Agent(args, rank).run()


if __name__ == "__main__":
    sys.exit(main())
