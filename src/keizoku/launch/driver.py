"""``keizoku launch`` inside an allocation: from the scheduler's hosts to running training processes.

Runs once per job, on the batch host (where the job script runs). It

1. reads the allocation (``allocation.detect``) and, before starting anything, whether the run is already
   complete (then it exits 0 at once: a spare link of a ``--chain`` costs seconds);
2. picks the rendezvous address (this host) and a port that no other job on this host holds (``port``);
3. starts the training processes the way the site supports (the plan's ``starter``):

   - ``launcher: node`` — one keizoku node agent per node (``agent``: like ``torchrun --nnodes N
     --node-rank R``), started by ``srun``, ``mpirun -npernode 1``, ``pbsdsh -u``, ``qrsh -inherit`` or
     ``ssh``, or as local processes (``local``: one machine, or several agents on it for testing);
   - ``launcher: mpi`` — one process per GPU started by ``mpirun -npernode G`` or ``srun
     --ntasks-per-node G``; each maps its MPI/Slurm rank to torch's variables (``worker``);

4. relays the scheduler's pre-walltime signal (SIGUSR1/SIGUSR2/SIGTERM) to every node — by signal to the
   children that forward it (srun, mpirun, local agents) and by a stop file in the run directory that every
   agent watches (for starters that forward nothing) — and can stop the run itself ``stop_margin_s`` before
   the walltime (PBS sends no warning of its own);
5. if a node fails, stops the others within ``failure_grace_s``; exits with the training's status: 0 done,
   3 stopped after saving (resubmit: the next chained job resumes), anything else failed.

Standard library only, Python >= 3.8 (like ``allocation`` and ``port``): with ``--container`` the job
script runs this file on the node's own ``python3`` — the scheduler's commands (srun, mpirun, qrsh) live
outside the container, training runs inside it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

try:  # a package module normally; a lone copy beside the job script under --container
    from keizoku.launch.allocation import Allocation, AllocationError, detect
    from keizoku.launch.port import PortError, pick_port
except ImportError:  # pragma: no cover - exercised by the container tests through a copied file
    from allocation import Allocation, AllocationError, detect  # type: ignore
    from port import PortError, pick_port  # type: ignore

EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_PREEMPTED = 0, 1, 2, 3
GRACEFUL = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)  # walltime warnings: save, then stop
ABORT = (signal.SIGINT, signal.SIGHUP)
STARTERS = ("srun", "mpirun", "pbsdsh", "qrsh", "ssh", "local")
MPI_STARTERS = ("srun", "mpirun")


class LaunchError(RuntimeError):
    pass


@dataclass
class Plan:
    """Everything the driver needs, as JSON: ``keizoku submit`` writes it beside the job script."""

    train_args: List[str]  # CONFIG and overrides, exactly as for `keizoku train`
    run_dir: str  # absolute: job records, stop files and the completeness check live here
    total_steps: Optional[int] = None  # at submission; the config is read again at launch when possible
    launcher: str = "node"  # node | mpi
    starter: str = "local"  # srun | mpirun | pbsdsh | qrsh | ssh | local
    procs_per_node: int = 0  # 0: the GPUs visible on the batch host, or 1 without GPUs
    python: List[str] = field(default_factory=lambda: [sys.executable])  # keizoku's python on a node
    mpirun: List[str] = field(default_factory=lambda: ["mpirun"])  # the command and its site flags
    env: Dict[str, str] = field(default_factory=dict)  # for the training processes (NCCL_*, ...)
    walltime_s: Optional[int] = None
    stop_margin_s: int = 0  # stop by ourselves this long before the walltime (0: rely on the scheduler)
    failure_grace_s: float = 30.0  # after a failure, how long the others get before SIGKILL
    workdir: str = ""  # cwd of the training processes (relative paths in the config)

    @classmethod
    def from_json(cls, path: str) -> "Plan":
        with open(path) as f:
            data = json.load(f)
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise LaunchError(f"{path}: unknown keys {sorted(unknown)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1) + "\n"


def log(msg: str) -> None:
    print(f"keizoku launch: {msg}", file=sys.stderr, flush=True)


# --- completeness -----------------------------------------------------------------------------------------

def completed_checkpoint(run_dir: str) -> Optional[tuple[int, str]]:
    """(step, directory) of the newest complete checkpoint of either engine: engine: torch writes
    ``step_NNNNNNNN`` directories with their trainer state; engine: megatron (Megatron-Bridge) writes
    ``iter_NNNNNNN`` and names the newest finished one in ``latest_checkpointed_iteration.txt`` (written after
    the save, asynchronous ones included, is complete)."""
    root = os.path.join(run_dir, "checkpoints")
    found = []
    try:
        names = os.listdir(root)
    except OSError:
        return None
    found += [(int(n[5:]), os.path.join(root, n)) for n in names if n.startswith("step_") and n[5:].isdigit()
              and os.path.exists(os.path.join(root, n, "trainer_state.json"))]
    try:
        with open(os.path.join(root, "latest_checkpointed_iteration.txt")) as f:
            text = f.read().strip()
        if text.isdigit() and os.path.isdir(os.path.join(root, f"iter_{int(text):07d}")):
            found.append((int(text), os.path.join(root, f"iter_{int(text):07d}")))
    except OSError:
        pass
    return max(found) if found else None


def completed_step(run_dir: str) -> Optional[int]:
    """Step of the newest complete checkpoint (``completed_checkpoint``)."""
    newest = completed_checkpoint(run_dir)
    return newest[0] if newest else None


def total_steps_now(plan: Plan) -> Optional[int]:
    """The run's length from its config as it is now (it may have been edited between chained jobs)."""
    try:
        from keizoku.launch.progress import total_steps_for_args
    except ImportError:  # outside the container: ask keizoku inside it
        try:
            out = subprocess.run([*plan.python, "-m", "keizoku.launch.progress", "total-steps", *plan.train_args],
                                 capture_output=True, text=True, timeout=600, cwd=plan.workdir or None)
            if out.returncode == 0 and out.stdout.strip().isdigit():
                return int(out.stdout)
        except (OSError, subprocess.SubprocessError):
            pass
        return plan.total_steps
    cwd = os.getcwd()
    try:
        if plan.workdir:
            os.chdir(plan.workdir)
        return total_steps_for_args(plan.train_args)
    finally:
        os.chdir(cwd)


def is_complete(plan: Plan) -> Optional[str]:
    """A message when the run is already done, else None."""
    step = completed_step(plan.run_dir)
    if step is None:
        return None
    total = total_steps_now(plan)
    if total is not None and step >= total:
        return f"training is complete (step {step} of {total}); nothing to run"
    return None


# --- topology ---------------------------------------------------------------------------------------------

def visible_gpus(env=os.environ) -> int:
    devices = env.get("CUDA_VISIBLE_DEVICES")
    if devices is not None:
        return len([d for d in devices.split(",") if d.strip() and d.strip() != "-1"])
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU ")) if out.returncode == 0 else 0


@dataclass
class Topology:
    alloc: Allocation
    nproc: int
    master_addr: str
    master_port: int

    @property
    def world(self) -> int:
        return self.alloc.nnodes * self.nproc

    def describe(self, plan: Plan) -> str:
        hosts = ", ".join(self.alloc.hosts[:8]) + (" …" if self.alloc.nnodes > 8 else "")
        return (f"{self.alloc.scheduler} job {self.alloc.job_id}: {self.alloc.nnodes} node(s) [{hosts}] × "
                f"{self.nproc} process(es) = world size {self.world}; rendezvous {self.master_addr}:"
                f"{self.master_port}; launcher {plan.launcher} via {plan.starter}")


# --- commands ----------------------------------------------------------------------------------------------

def agent_command(plan: Plan, topo: Topology, stop_file: str, node_rank: Optional[int] = None,
                  watch_stdin: bool = False) -> List[str]:
    cmd = [*plan.python, "-m", "keizoku.launch.agent", "--nnodes", str(topo.alloc.nnodes),
           "--nproc-per-node", str(topo.nproc), "--master-addr", topo.master_addr,
           "--master-port", str(topo.master_port), "--run-id", topo.alloc.job_id,
           "--hosts", ",".join(topo.alloc.hosts), "--stop-file", stop_file,
           "--failure-grace", str(plan.failure_grace_s), "--workdir", plan.workdir or os.getcwd()]
    for key, value in sorted(plan.env.items()):
        cmd += ["--env", f"{key}={value}"]
    if node_rank is not None:
        cmd += ["--node-rank", str(node_rank)]
    if watch_stdin:
        cmd.append("--watch-stdin")
    return cmd + ["--", *plan.train_args]


def worker_command(plan: Plan, topo: Topology) -> List[str]:
    cmd = [*plan.python, "-m", "keizoku.launch.worker", "--master-addr", topo.master_addr,
           "--master-port", str(topo.master_port), "--workdir", plan.workdir or os.getcwd()]
    for key, value in sorted(plan.env.items()):
        cmd += ["--env", f"{key}={value}"]
    return cmd + ["--", *plan.train_args]


def hostfile(path: str, hosts: List[str], per_host: int) -> str:
    """An OpenMPI hostfile in launch order (rank 0's host first)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.writelines(f"{h} slots={per_host}\n" for h in hosts)
    os.replace(tmp, path)
    return path


@dataclass
class Child:
    label: str
    argv: List[str]
    relay: bool  # forwards a signal sent to it (srun, mpirun, a local agent); a remote shell client does not
    stdin_pipe: bool = False
    proc: Optional[subprocess.Popen] = None


def children(plan: Plan, topo: Topology, stop_file: str, launch_dir: str) -> List[Child]:
    n, hosts = topo.alloc.nnodes, topo.alloc.hosts
    if plan.launcher == "mpi":
        work = worker_command(plan, topo)
        if plan.starter == "srun":
            return [Child("srun", ["srun", f"--nodes={n}", f"--ntasks={topo.world}",
                                   f"--ntasks-per-node={topo.nproc}", "--kill-on-bad-exit=1", *work], True)]
        if plan.starter == "mpirun":
            hf = hostfile(os.path.join(launch_dir, f"hostfile.{topo.alloc.job_id}"), hosts, topo.nproc)
            return [Child("mpirun", [*plan.mpirun, "-np", str(topo.world), "-npernode", str(topo.nproc),
                                     "--hostfile", hf, *work], True)]
        raise LaunchError(f"launcher: mpi needs starter srun or mpirun, not {plan.starter}")
    if plan.starter == "srun":
        # --wait: after the first node agent ends, the others get this long (they normally end together;
        # a failed node's peers are stopped by their own agents or, at the latest, then)
        return [Child("srun", ["srun", f"--nodes={n}", f"--ntasks={n}", "--ntasks-per-node=1",
                               f"--wait={int(plan.failure_grace_s) + 30}", "--kill-on-bad-exit=0",
                               *agent_command(plan, topo, stop_file)], True)]
    if plan.starter == "mpirun":
        hf = hostfile(os.path.join(launch_dir, f"hostfile.{topo.alloc.job_id}"), hosts, 1)
        return [Child("mpirun", [*plan.mpirun, "-np", str(n), "-npernode", "1", "--hostfile", hf,
                                 *agent_command(plan, topo, stop_file)], True)]
    if plan.starter == "pbsdsh":
        return [Child("pbsdsh", ["pbsdsh", "-u", "--", *agent_command(plan, topo, stop_file)], False)]
    if plan.starter == "local":
        return [Child(f"node {r}", agent_command(plan, topo, stop_file, node_rank=r), True) for r in range(n)]
    if plan.starter in ("qrsh", "ssh"):
        # node 0 runs here; the rest through the remote shell, whose stdin we hold: when this driver dies,
        # the remote agent reads EOF and stops its workers (qrsh and ssh both forward stdin and its end)
        out = [Child("node 0", agent_command(plan, topo, stop_file, node_rank=0), True)]
        for r in range(1, n):
            remote = shlex.join(agent_command(plan, topo, stop_file, node_rank=r, watch_stdin=True))
            shell = ["qrsh", "-inherit", hosts[r]] if plan.starter == "qrsh" else \
                ["ssh", "-o", "BatchMode=yes", hosts[r]]
            out.append(Child(f"node {r} ({hosts[r]})", [*shell, remote], False, stdin_pipe=True))
        return out
    raise LaunchError(f"starter: {plan.starter!r} is not one of {', '.join(STARTERS)}")


# --- running ------------------------------------------------------------------------------------------------

class Driver:
    def __init__(self, plan: Plan, topo: Topology, stop_file: str):
        self.plan, self.topo, self.stop_file = plan, topo, stop_file
        self.stop_reason: Optional[str] = None
        self.abort_reason: Optional[str] = None
        self.kids: List[Child] = []
        self._wake = threading.Event()

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if signum in ABORT:
            self.abort_reason = self.abort_reason or f"{name} received"
        else:
            self.stop_reason = self.stop_reason or f"{name} received"
        self._wake.set()

    def request_stop(self, reason: str) -> None:
        log(f"{reason}: asking every node to save a checkpoint and stop")
        try:
            with open(self.stop_file, "w") as f:
                f.write(reason + "\n")
        except OSError as e:
            log(f"cannot write the stop file {self.stop_file} ({e.strerror}); relying on signals")
        for kid in self.kids:
            if kid.relay and kid.proc and kid.proc.poll() is None:
                kid.proc.send_signal(signal.SIGUSR1)

    def abort(self, reason: str) -> None:
        log(f"{reason}: stopping all nodes")
        for kid in self.kids:
            if kid.proc and kid.proc.poll() is None:
                kid.proc.send_signal(signal.SIGINT if kid.relay else signal.SIGTERM)
                if kid.label == "srun":  # srun ends the step on a second SIGINT within a second
                    time.sleep(0.2)
                    kid.proc.send_signal(signal.SIGINT)
        deadline = time.monotonic() + self.plan.failure_grace_s
        while time.monotonic() < deadline and any(k.proc.poll() is None for k in self.kids if k.proc):
            time.sleep(0.2)
        for kid in self.kids:
            if kid.proc and kid.proc.poll() is None:
                log(f"{kid.label} did not stop within {self.plan.failure_grace_s:g} s: SIGKILL")
                _kill_group(kid.proc, signal.SIGKILL)

    def run(self, launch_dir: str) -> int:
        for sig in GRACEFUL + ABORT:
            signal.signal(sig, self._on_signal)
        self.kids = children(self.plan, self.topo, self.stop_file, launch_dir)
        for kid in self.kids:
            # own session: a signal to the job's process group (Grid Engine's -notify) must not kill a qrsh
            # client or srun outright; we relay it deliberately
            kid.proc = subprocess.Popen(kid.argv, start_new_session=True, preexec_fn=_ignore_warnings,
                                        stdin=subprocess.PIPE if kid.stdin_pipe else subprocess.DEVNULL)
        deadline = None
        if self.plan.walltime_s and self.plan.stop_margin_s:
            deadline = time.monotonic() + self.plan.walltime_s - self.plan.stop_margin_s
        stopping = aborted = False
        first_failure: Optional[int] = None
        while True:
            codes = [k.proc.poll() for k in self.kids]
            if all(c is not None for c in codes):
                break
            if not stopping and deadline is not None and time.monotonic() >= deadline:
                self.stop_reason = self.stop_reason or \
                    f"{self.plan.stop_margin_s} s before the walltime ({self.plan.walltime_s} s)"
            if self.stop_reason and not stopping:
                stopping = True
                self.request_stop(self.stop_reason)
            if not aborted:
                failed = [(k, c) for k, c in zip(self.kids, codes) if c not in (None, EXIT_OK, EXIT_PREEMPTED)]
                if failed or self.abort_reason:
                    if failed:
                        kid, code = failed[0]
                        first_failure = code
                        log(f"{kid.label} failed ({_describe(code)})")
                    aborted = True
                    self.abort(self.abort_reason or "a node failed")
                    continue
            self._wake.wait(0.2)
            self._wake.clear()
        codes = [k.proc.returncode for k in self.kids]
        if all(c == EXIT_OK for c in codes):
            return EXIT_OK
        if all(c in (EXIT_OK, EXIT_PREEMPTED) for c in codes):
            return EXIT_PREEMPTED
        if first_failure is None:
            first_failure = next(c for c in codes if c not in (EXIT_OK, EXIT_PREEMPTED))
        return _as_exit_status(first_failure)


def _ignore_warnings() -> None:
    """In a child before exec: a warning signal that comes before the agent has installed its handlers must
    not kill it (SIGUSR1/SIGUSR2's default action); the stop file tells it later."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


def _describe(code: int) -> str:
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit status {code}"


def _as_exit_status(code: int) -> int:
    return 128 - code if code < 0 else (code or EXIT_FAILED)


def _kill_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def record(run_dir: str, job_id: str, data: dict) -> None:
    """RUN_DIR/jobs/JOB_ID.json: what ran where and how it ended (read by ``keizoku status``)."""
    path = os.path.join(run_dir, "jobs", f"{_safe(job_id)}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    old = {}
    if os.path.exists(path):
        try:
            with open(path) as f:
                old = json.load(f)
        except (OSError, ValueError):
            old = {}
    old.update(data)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(old, f, indent=1)
    os.replace(tmp, path)


def _safe(job_id: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in job_id)


def launch(plan: Plan, env=os.environ) -> int:
    """Run the plan in this allocation; returns the exit status (see the module docstring)."""
    if plan.launcher not in ("node", "mpi"):
        raise LaunchError(f"launcher: {plan.launcher!r} is not node or mpi")
    if plan.starter not in STARTERS:
        raise LaunchError(f"starter: {plan.starter!r} is not one of {', '.join(STARTERS)}")
    alloc = detect(env)
    done = is_complete(plan)
    if done:
        log(done)
        now = time.time()
        record(plan.run_dir, alloc.job_id, {"job_id": alloc.job_id, "scheduler": alloc.scheduler, "hosts": alloc.hosts,
                                            "started": now, "ended": now, "exit_status": EXIT_OK,
                                            "state": "completed", "stop_reason": None, "note": done})
        return EXIT_OK
    nproc = plan.procs_per_node or visible_gpus(env) or 1
    port, lock_fd = pick_port(alloc.job_id)
    topo = Topology(alloc, nproc, socket.gethostname(), port)
    if plan.launcher == "mpi" and plan.starter == "srun" and alloc.hosts and \
            alloc.hosts[0] != (env.get("SLURM_JOB_NODELIST") and _first_slurm_node(env)):
        raise LaunchError("launcher: mpi with srun needs the batch host to be the first node of the job "
                          f"(rank 0 rendezvous); here it is {alloc.batch_host}. Use launcher: node")
    launch_dir = os.path.join(plan.run_dir, "launch")
    os.makedirs(launch_dir, exist_ok=True)
    stop_file = os.path.join(launch_dir, f"stop.{_safe(alloc.job_id)}")
    if os.path.exists(stop_file):
        os.unlink(stop_file)
    log(topo.describe(plan))
    started = time.time()
    record(plan.run_dir, alloc.job_id, {
        "job_id": alloc.job_id, "scheduler": alloc.scheduler, "hosts": alloc.hosts, "procs_per_node": nproc,
        "world_size": topo.world, "master": f"{topo.master_addr}:{port}", "launcher": plan.launcher,
        "starter": plan.starter, "started": started, "state": "running"})
    driver = Driver(plan, topo, stop_file)
    try:
        status = driver.run(launch_dir)
    finally:
        os.close(lock_fd)
    outcome = {EXIT_OK: "completed", EXIT_PREEMPTED: "stopped after saving"}.get(status, "failed")
    record(plan.run_dir, alloc.job_id, {"ended": time.time(), "exit_status": status, "state": outcome,
                                        "stop_reason": driver.stop_reason})
    if status == EXIT_PREEMPTED:
        log("stopped after saving a checkpoint (exit 3): resubmit, or let the next chained job continue")
    else:
        log(f"{outcome} (exit {status}) after {time.time() - started:.0f} s")
    return status


def _first_slurm_node(env) -> str:
    from_list = env["SLURM_JOB_NODELIST"]
    try:
        from keizoku.launch.allocation import expand_nodelist
    except ImportError:  # pragma: no cover
        from allocation import expand_nodelist  # type: ignore
    return expand_nodelist(from_list)[0]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="keizoku-launch-driver", description=__doc__.split("\n\n")[0])
    parser.add_argument("--plan", required=True, help="plan JSON written by keizoku submit")
    args = parser.parse_args(argv)
    try:
        return launch(Plan.from_json(args.plan))
    except (LaunchError, AllocationError, PortError) as e:
        log(f"error: {e}")
        return EXIT_CONFIG


if __name__ == "__main__":
    sys.exit(main())
