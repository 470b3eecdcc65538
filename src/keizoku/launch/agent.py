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
  the agent reports which rank failed, where and how (``--failure-file``: the driver puts it into the job
  record) and exits non-zero, and so the driver stops the other nodes.
- **abort** — SIGINT, SIGHUP, or (``--watch-stdin``, under qrsh/ssh) end of stdin when the driver is gone:
  like a failure. The training processes also die with the agent (``PR_SET_PDEATHSIG``).

Exit status: 0 if every rank finished, 3 if they stopped after saving, otherwise the failed rank's status
(128 + signal number when killed): ``keizoku.rundir.ExitCode``. Runs with keizoku's python (inside the
container, if any); it shares the driver's signal handling (``driver.SignalWatch``) and, like it, needs only the
standard library, so that it starts fast.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional

from keizoku.launch.driver import ENDED_WELL, SignalWatch, describe_exit, ignore_warnings, kill_group, log
from keizoku.launch.schedulers import signal_name
from keizoku.rundir import ExitCode, write_atomic

RELAY_EVERY_S = 2.0  # repeat the stop signal: a rank still starting up ignores it (see _child_setup)


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
    # ignored until the trainer installs its handler (a warning may come while it imports); the agent repeats
    # the signal until the ranks exit
    ignore_warnings()


class Agent(SignalWatch):
    def __init__(self, args: argparse.Namespace, node_rank: int):
        super().__init__()
        self.args, self.node_rank = args, node_rank
        self.procs: List[subprocess.Popen] = []
        self.stopping = False
        self._last_relay = 0.0

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

    def _watch_stdin(self) -> None:
        try:
            while os.read(0, 4096):
                pass
        except OSError:
            pass
        self.abort_for("the launch driver is gone (end of stdin)")

    def run(self) -> int:
        """Start the node's training processes and watch them until they end; the node's exit status."""
        self.listen()
        self._start()
        if self.args.watch_stdin:
            threading.Thread(target=self._watch_stdin, daemon=True).start()
        while True:
            codes = [p.poll() for p in self.procs]
            if all(c in ENDED_WELL for c in codes):
                return ExitCode.OK if all(c == ExitCode.OK for c in codes) else ExitCode.STOPPED
            if None in codes:
                self._relay_stop()
            failed = [(i, c) for i, c in enumerate(codes) if c not in (None, *ENDED_WELL)]
            if failed:
                return self._fail(*failed[0])
            if self.abort_reason:
                log(f"node {self.node_rank}: {self.abort_reason}; stopping the training processes")
                self._terminate()
                return ExitCode.FAILED
            self.pause(0.2)

    def _start(self) -> None:
        cmd = [sys.executable, "-m", "keizoku", "train", *self.args.train_args]
        for local in range(self.args.nproc_per_node):
            # own session: the scheduler's group signals must not reach DataLoader workers; we relay
            self.procs.append(subprocess.Popen(cmd, env=self.worker_env(local), cwd=self.args.workdir or None,
                                               start_new_session=True, preexec_fn=_child_setup,
                                               stdin=subprocess.DEVNULL))

    def _relay_stop(self) -> None:
        """On a signal or the stop file: SIGUSR1 to every running rank, repeated every RELAY_EVERY_S."""
        if not self.stopping and self.args.stop_file and os.path.exists(self.args.stop_file):
            self.stop_reason = self.stop_reason or "the driver's stop file"
        if self.stop_reason and not self.stopping:
            self.stopping = True
            log(f"node {self.node_rank}: {self.stop_reason}: telling the training processes to save and stop")
        if self.stopping and time.monotonic() - self._last_relay > RELAY_EVERY_S:
            self._last_relay = time.monotonic()
            for p in self.procs:
                if p.poll() is None:
                    os.kill(p.pid, signal.SIGUSR1)  # the process only, not its DataLoader workers

    def _fail(self, local_rank: int, code: int) -> int:
        rank = self.node_rank * self.args.nproc_per_node + local_rank
        log(f"node {self.node_rank}: rank {rank} (pid {self.procs[local_rank].pid}) failed "
            f"({describe_exit(code)}); stopping the other ranks")
        self._report(rank, local_rank, code)
        self._terminate()
        return ExitCode.of_returncode(code)

    def _report(self, rank: int, local_rank: int, code: int) -> None:
        """The failed rank, for the driver's job record (``driver.failure_detail``): FAILURE_FILE.nodeR.json."""
        if not self.args.failure_file:
            return
        hosts = [h for h in self.args.hosts.split(",") if h]
        host = hosts[self.node_rank] if self.node_rank < len(hosts) else socket.gethostname()
        report = {"time": time.time(), "rank": rank, "local_rank": local_rank, "node_rank": self.node_rank,
                  "host": host, "pid": self.procs[local_rank].pid, "exit_status": ExitCode.of_returncode(code),
                  "signal": signal_name(-code) if code < 0 else None, "how": describe_exit(code, verb=True)}
        try:
            write_atomic(f"{self.args.failure_file}.node{self.node_rank}.json", json.dumps(report))
        except OSError as e:
            log(f"node {self.node_rank}: cannot report the failure ({e.strerror})")

    def _terminate(self) -> None:
        live = [p for p in self.procs if p.poll() is None]
        for p in live:
            kill_group(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.args.failure_grace
        while time.monotonic() < deadline and any(p.poll() is None for p in live):
            time.sleep(0.1)
        for p in live:
            if p.poll() is None:
                kill_group(p.pid, signal.SIGKILL)
                p.wait()


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
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
    p.add_argument("--failure-file", default="", help="report a failed rank to FAILURE_FILE.nodeR.json")
    p.add_argument("--failure-grace", type=float, default=30.0)
    p.add_argument("--workdir", default="")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--watch-stdin", action="store_true", help="abort when stdin ends (driver gone)")
    p.add_argument("train_args", nargs="+", help="-- CONFIG [overrides] for keizoku train")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    hosts = [h for h in args.hosts.split(",") if h]
    rank = args.node_rank if args.node_rank is not None else node_rank_of(hosts)
    if not 0 <= rank < args.nnodes:
        raise SystemExit(f"keizoku launch: node rank {rank} is outside 0..{args.nnodes - 1}")
    return Agent(args, rank).run()


if __name__ == "__main__":
    sys.exit(main())
