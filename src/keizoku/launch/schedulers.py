"""Batch schedulers — Grid Engine, PBS, Slurm, and none (local) — behind one protocol, ``Scheduler``.

Each scheduler is one class here, registered with ``@register``; nothing else in keizoku asks which scheduler it
is. A scheduler knows

- **its jobs' allocation**: whether this process runs in one of its jobs (``in_job``) and which machines the job
  has (``allocation``), from the scheduler's own variables, as seen inside real jobs:

  - Grid Engine (SGE, Altair GE on TSUBAME4.0): ``JOB_ID``, ``PE_HOSTFILE`` (lines ``host slots queue range``;
    one line per host and queue), ``NHOSTS``, ``NSLOTS``;
  - PBS (PBS Pro on ABCI 3.0, Torque): ``PBS_JOBID``, ``PBS_NODEFILE`` (one line per MPI slot: a host repeats);
  - Slurm: ``SLURM_JOB_ID``, ``SLURM_JOB_NODELIST`` (compressed: ``gpu[01-04,07],login1``),
    ``SLURM_TASKS_PER_NODE``, ``SLURMD_NODENAME``;
  - none: this machine (``KEIZOKU_LOCAL_JOB_ID``, set by ``keizoku submit --profile local``, names the job);

- **its job scripts**: the directive prefix (``#$``, ``#PBS``, ``#SBATCH``) and directives, the walltime's
  format (``walltime_seconds``; ``walltime_value`` writes ``D-HH:MM:SS`` as ``HH:MM:SS`` where the scheduler takes
  no days), and the warning it sends before the walltime kill (``warning_signal``: Grid
  Engine's ``-notify`` sends SIGUSR2, Slurm's ``--signal=B:USR1@N`` SIGUSR1; PBS sends none, so keizoku's own
  ``stop_margin_s`` stands in);
- **submission**: the command that submits a script after another job (the chain's dependency, however that job
  ended; or, ``after_ok``, only once it succeeded) and the job id it prints (``submit_command``, ``parse_job_id``),
  which of its refusals mean it could not be reached (``unreachable``: ``keizoku submit`` tries again) and where a
  job's output goes (``log_path``);
- **array jobs** (``keizoku submit tokenize``: one task per share): the directive that makes a script an array of
  tasks 1…N (``JobSpec.tasks``: Grid Engine ``-t 1-N``, Slurm ``--array=1-N``, PBS ``-J 1-N``), the variable that
  holds a task's number (``task_variable``: ``SGE_TASK_ID``, ``SLURM_ARRAY_TASK_ID``, ``PBS_ARRAY_INDEX``) and
  each task's log;
- **its jobs, live and ended**: what its queue says of the jobs it still holds (``job_states``: squeue, qstat; a
  ``QueryError`` when it cannot be asked), and what its accounting says of a job that has left the queue
  (``job_ends``: sacct, else ``scontrol show job`` while Slurm remembers it; qacct; ``qstat -x -f``), as a
  ``JobEnd``: completed, failed, cancelled, timeout, node_fail, out_of_memory, with the exit status or signal;
- **starting processes on its nodes**: its native starter (srun, qrsh, pbsdsh, local) and which starters it
  allows (``starters``).

``detect_allocation`` asks each registered scheduler in registration order whether this process runs in its job
(a scheduler whose variables are generic, like Grid Engine's ``JOB_ID``, is registered after specific ones);
none: this machine. ``KEIZOKU_HOSTS`` (comma- or space-separated) then narrows the hosts to use, in that
order; every entry must belong to the allocation. A host may repeat, which starts several node launchers on one
machine: how the tests emulate two nodes on one host.

Standard library only, Python >= 3.8: the launch driver reads this module on a compute node's own ``python3``
outside the training container (see ``driver``), where keizoku's dependencies are not installed.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, List, Mapping, Optional, Sequence, Tuple

if TYPE_CHECKING:  # only for annotations: this module must import without keizoku's dependencies
    from keizoku.launch.profile import Profile
    from keizoku.launch.script import JobSpec

JobStates = Dict[str, Tuple[str, str]]  # {job id: (state, detail)} of the jobs a queue still holds
ANY_SCHEDULER_STARTERS = ("mpirun", "ssh", "local")  # reach the hosts they are given, under any scheduler
LOCAL_JOB_ID = "KEIZOKU_LOCAL_JOB_ID"  # the job id of a job script that `keizoku submit --profile local` runs


class AllocationError(RuntimeError):
    """The scheduler's variables or files are missing or malformed; the message names which."""


class QueryError(RuntimeError):
    """The scheduler could not be asked about its jobs (command missing, controller down); the message says which
    command said what."""


@dataclass
class JobEnd:
    """How a job that has left the queue ended, in the scheduler's accounting (``Scheduler.job_ends``)."""

    state: str  # completed, failed, cancelled, timeout, node_fail, out_of_memory
    exit_status: Optional[int] = None  # the job script's, shell style: 128 + N when killed by signal N
    signal: Optional[int] = None  # the signal that ended the job script, if one did
    host: str = ""  # where the job script ran
    words: str = ""  # the scheduler's own words, e.g. "slurm: FAILED, ExitCode 0:9"

    def how(self) -> str:
        """``killed by SIGKILL``, ``exit status 1``, or the state."""
        if self.signal:
            return f"killed by {signal_name(self.signal)}"
        return f"exit status {self.exit_status}" if self.exit_status is not None else self.state


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


@dataclass
class Allocation:
    scheduler: str  # the name of a registered Scheduler
    job_id: str
    hosts: List[str]  # the node list in launch order; hosts[0] runs node rank 0 (the batch host when known)
    slots: List[int] = field(default_factory=list)  # slots granted per host (GE/PBS), tasks per node (Slurm)
    batch_host: str = ""  # where the job script runs
    first_listed: str = ""  # the first host in the scheduler's own order (where srun places task 0)

    @property
    def nnodes(self) -> int:
        return len(self.hosts)


def short(host: str) -> str:
    return host.split(".", 1)[0]


# --- the protocol ---------------------------------------------------------------------------------------------

class Scheduler:
    """What keizoku needs of a batch scheduler. Subclasses set the attributes and override what differs."""

    name = ""
    directive_prefix = ""  # job script lines that start with this are the scheduler's (none: no directives)
    native_starter = "local"  # what starts processes on the job's nodes: srun, qrsh -inherit, pbsdsh, local
    warning_signal: Optional[str] = None  # sent before the walltime kill, as the job script asks for it
    walltime_option = ""  # the directive that sets the walltime, for messages
    takes_days = False  # the walltime directive takes D-HH:MM:SS as written (else it is written as HH:MM:SS)
    stop_before_walltime: Tuple[str, ...] = ("stop_margin_s",)  # profile settings (s) less than the walltime
    queues_jobs = True  # False: keizoku submit runs the job script here instead of submitting it
    hosts_are_allocated = True  # KEIZOKU_HOSTS must name hosts of the allocation
    task_variable = ""  # in an array job's task: its number, 1…N

    @property
    def starters(self) -> Tuple[str, ...]:
        """The driver's starters (``driver.STARTS``) this scheduler's jobs may use: its own, and those that need
        no scheduler."""
        return tuple(dict.fromkeys((self.native_starter, *ANY_SCHEDULER_STARTERS)))

    # allocation
    def in_job(self, env: Mapping[str, str]) -> bool:
        """Whether these variables are those of one of this scheduler's jobs."""
        raise NotImplementedError

    def allocation(self, env: Mapping[str, str], hostname: str) -> Allocation:
        """The job's hosts from the scheduler's variables (``hostname``: this machine, the batch host)."""
        raise NotImplementedError

    # job scripts
    def directives(self, profile: "Profile", spec: "JobSpec") -> List[str]:
        """The job script's directives from the profile (without the profile's own ``directives``): an array of
        ``spec.tasks`` tasks if it has any, the walltime warning if ``spec.walltime_warning``."""
        return []

    def walltime_seconds(self, text: str) -> int:
        """The walltime in seconds; ValueError (naming no key) if it is not a time this scheduler can be given."""
        return parse_walltime(text)

    def walltime_value(self, text: str) -> str:
        """The walltime as this scheduler's directive takes it: ``D-HH:MM:SS`` becomes ``HH:MM:SS`` (hours past
        24) where the scheduler takes no days (Grid Engine's ``h_rt``, PBS's ``walltime``)."""
        seconds = self.walltime_seconds(text)
        return str(text) if self.takes_days or "-" not in str(text) else format_walltime(seconds)

    def profile_errors(self, profile: "Profile") -> List[str]:
        """What is wrong with a profile for this scheduler: its walltime, the stops before it, its starter."""
        starter = self.starter_error(profile.starter)
        return self._walltime_errors(profile) + ([starter] if starter else [])

    def _walltime_errors(self, profile: "Profile") -> List[str]:
        if profile.walltime is None:
            return []
        try:
            limit = self.walltime_seconds(profile.walltime)
        except ValueError as e:
            where = f"; {self.name}'s {self.walltime_option}" if self.walltime_option else ""
            return [f"walltime (--walltime{where}): {e}"]
        return [f"{key}: {getattr(profile, key)} s is not less than the walltime ({limit} s): the job would be "
                f"told to stop as it starts" for key in self.stop_before_walltime if getattr(profile, key) >= limit]

    def starter_error(self, starter: str) -> Optional[str]:
        """Why this scheduler's jobs cannot use ``starter`` (one of the driver's), or None."""
        if starter in self.starters:
            return None
        owners = [s.name for s in SCHEDULERS.values() if s.native_starter == starter and s is not self]
        return (f"starter: {starter} needs scheduler: {_or(owners) or 'another'} (with scheduler: {self.name} "
                f"use {_or(self.starters)})")

    # submission and the queue
    def submit_command(self, profile: "Profile", script: str, after: Optional[str] = None,
                       after_ok: bool = False) -> List[str]:
        """The command that submits ``script``, to start after job ``after`` (all its tasks) ends however it ended;
        ``after_ok``: only if it succeeded, where the scheduler can tell (else it is not started)."""
        raise NotImplementedError

    def parse_job_id(self, stdout: str) -> str:
        """The job id the submit command printed (its last line)."""
        return self._checked_id(_last_line(stdout), stdout)

    def _checked_id(self, text: str, stdout: str) -> str:
        if not text or not re.fullmatch(r"[\w.\-\[\]]+", text):
            raise ValueError(f"cannot read a job id from the {self.name} submit output {stdout!r}")
        return text

    unreachable_words: Tuple[str, ...] = ()  # in a submit command's refusal: the scheduler was not reached

    def unreachable(self, message: str) -> bool:
        """Whether a refused submission failed for want of the scheduler (connection refused, controller down), so
        that nothing was queued and the same command may be tried again. A timeout is not such a failure: the
        job may have been queued, and a second one would train the same run at the same time."""
        text = message.lower()
        return any(w.lower() in text for w in self.unreachable_words)

    def log_path(self, logs: str, name: str, job_id: str, task: Optional[int] = None) -> Optional[str]:
        """Where the job script's output goes (the directives write it under ``logs``); ``task``: of an array job."""
        return None

    cancel_command = ""  # what deletes a job, for messages

    def job_states(self, job_ids: Sequence[str]) -> JobStates:
        """{job id: (state, detail)} for the jobs the queue still holds (a job that has ended is not among them);
        QueryError if the queue cannot be asked."""
        command = self.state_command(job_ids)
        if not job_ids:
            return {}
        if command is None:
            raise QueryError(f"{self.name} has no queue to ask")
        proc = _run(command)
        if proc.returncode != 0 and not self.none_known(proc):
            raise QueryError(f"{command[0]} failed ({proc.returncode}): {one_line(proc.stderr or proc.stdout)}")
        return self.parse_states(proc.stdout, job_ids)

    def none_known(self, proc: subprocess.CompletedProcess) -> bool:
        """Whether a failed queue command only said that it knows none of the jobs (they have all left it)."""
        return False

    def state_command(self, job_ids: Sequence[str]) -> Optional[List[str]]:
        return None

    def parse_states(self, stdout: str, job_ids: Sequence[str]) -> JobStates:
        return {}

    def job_ends(self, job_ids: Sequence[str]) -> Dict[str, JobEnd]:
        """How the jobs that have left the queue ended, from the scheduler's accounting; the jobs it has no record
        of are missing (a job deleted before it started, or one it no longer remembers). Best effort: never
        raises."""
        return {}


SCHEDULERS: Dict[str, Scheduler] = {}  # in registration order, which is detection order


def register(cls: type) -> type:
    """Class decorator: make a Scheduler known by its ``name``."""
    SCHEDULERS[cls.name] = cls()
    return cls


def scheduler_named(name: str) -> Scheduler:
    try:
        return SCHEDULERS[name]
    except KeyError:
        raise ValueError(f"scheduler: {name!r} is not one of {', '.join(SCHEDULERS)}") from None


def scheduler_of(env: Mapping[str, str] = os.environ) -> Scheduler:
    """The scheduler whose job this process runs in (the first registered that claims it), else none: local."""
    return next((s for s in SCHEDULERS.values() if s.in_job(env)), SCHEDULERS["local"])


# --- the schedulers --------------------------------------------------------------------------------------------

@register
class Slurm(Scheduler):
    name = "slurm"
    directive_prefix = "#SBATCH"
    native_starter = "srun"
    warning_signal = "SIGUSR1"  # --signal=B:USR1@warning_signal_s, to the batch shell (the driver)
    walltime_option = "--time"
    takes_days = True
    stop_before_walltime = ("warning_signal_s", "stop_margin_s")
    task_variable = "SLURM_ARRAY_TASK_ID"

    def in_job(self, env: Mapping[str, str]) -> bool:
        return bool(env.get("SLURM_JOB_ID") and env.get("SLURM_JOB_NODELIST"))

    def allocation(self, env: Mapping[str, str], hostname: str) -> Allocation:
        hosts = expand_nodelist(env["SLURM_JOB_NODELIST"])
        per_node = slurm_task_counts(env.get("SLURM_TASKS_PER_NODE", ""))
        per_node = per_node if len(per_node) == len(hosts) else [1] * len(hosts)
        batch = env.get("SLURMD_NODENAME") or short(hostname)
        return Allocation(self.name, env["SLURM_JOB_ID"], hosts, per_node, batch)

    def directives(self, profile: "Profile", spec: "JobSpec") -> List[str]:
        p = profile
        per_node = 1 if p.launcher == "node" or spec.tasks else (p.procs_per_node or p.gpus_per_node or 1)
        log = "slurm-%A_%a.out" if spec.tasks else "slurm-%j.out"
        out = [f"--job-name={spec.name}", f"--output={spec.logs}/{log}", f"--nodes={p.nodes}",
               f"--ntasks-per-node={per_node}"]
        out += [f"--array=1-{spec.tasks}"] if spec.tasks else []
        out += [f"--time={p.walltime}"] if p.walltime else []
        out += [f"--gpus-per-node={p.gpus_per_node}"] if p.gpus_per_node else []
        out += [f"--partition={p.queue}"] if p.queue else []
        out += [f"--account={p.group}"] if p.group else []
        out += [f"--signal=B:USR1@{p.warning_signal_s}"] if p.warning_signal_s and spec.walltime_warning else []
        return out

    def submit_command(self, profile: "Profile", script: str, after: Optional[str] = None,
                       after_ok: bool = False) -> List[str]:
        # afterok: a dependency that can never be met (a task failed) cancels the job instead of leaving it queued
        wait = [f"--dependency=afterok:{after}", "--kill-on-invalid-dep=yes"] if after_ok else \
            [f"--dependency=afterany:{after}"]
        cmd = ["sbatch", "--parsable"] + (wait if after else [])
        return cmd + list(profile.submit_args) + [str(script)]

    def parse_job_id(self, stdout: str) -> str:
        """``sbatch --parsable``: ``123`` or ``123;cluster``."""
        return self._checked_id(_last_line(stdout).split(";", 1)[0], stdout)

    unreachable_words = ("Unable to contact slurm controller", "Connection refused", "connect failure")
    cancel_command = "scancel"
    _ENDS = {"COMPLETED": "completed", "FAILED": "failed", "CANCELLED": "cancelled", "TIMEOUT": "timeout",
             "DEADLINE": "timeout", "NODE_FAIL": "node_fail", "OUT_OF_MEMORY": "out_of_memory",
             "BOOT_FAIL": "failed", "PREEMPTED": "cancelled", "REVOKED": "cancelled"}

    def log_path(self, logs: str, name: str, job_id: str, task: Optional[int] = None) -> Optional[str]:
        if task is not None:
            return f"{logs}/slurm-{job_id}_{task}.out"  # --output=LOGS/slurm-%A_%a.out
        return f"{logs}/slurm-{job_id}.out"  # --output=LOGS/slurm-%j.out

    def state_command(self, job_ids: Sequence[str]) -> Optional[List[str]]:
        return ["squeue", "-h", "-j", ",".join(job_ids), "-o", "%i|%T|%r"]

    def none_known(self, proc: subprocess.CompletedProcess) -> bool:
        return "Invalid job id specified" in proc.stderr  # squeue -j, when every job has left the queue

    def parse_states(self, stdout: str, job_ids: Sequence[str]) -> JobStates:
        rows = [line.split("|") for line in stdout.splitlines() if line.count("|") == 2]
        return {i: (s.lower(), "" if r in ("None", "(null)") else r) for i, s, r in rows
                if s not in ("COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")}

    def job_ends(self, job_ids: Sequence[str]) -> Dict[str, JobEnd]:
        """sacct; for the jobs it does not know (accounting disabled, or not yet stored): ``scontrol show job``,
        which knows a job for ``MinJobAge`` (300 s by default) after its end."""
        if not job_ids:
            return {}
        ends: Dict[str, JobEnd] = {}
        out = _output(["sacct", "-n", "-P", "-X", "-j", ",".join(job_ids), "-o", "JobIDRaw,State,ExitCode,NodeList"])
        for line in (out or "").splitlines():
            parts = line.split("|")
            if len(parts) == 4 and parts[0] in job_ids:
                ends[parts[0]] = self._end(parts[1], parts[2], expand_first(parts[3]), "sacct")
        for job_id in job_ids:
            if job_id not in ends:
                end = self.parse_scontrol(_output(["scontrol", "-o", "show", "job", job_id]) or "", job_id)
                if end is not None:
                    ends[job_id] = end
        return {k: v for k, v in ends.items() if v is not None}

    def parse_scontrol(self, stdout: str, job_id: str) -> Optional[JobEnd]:
        """``scontrol -o show job ID``: one line of ``Key=Value``; None while the job is live."""
        fields = dict(re.findall(r"(\w+)=(\S*)", stdout))
        if fields.get("JobId") != job_id or not fields.get("JobState"):
            return None
        return self._end(fields["JobState"], fields.get("ExitCode", ""), fields.get("BatchHost", ""), "slurm",
                         fields.get("Reason", ""))

    def _end(self, state: str, exit_code: str, host: str, source: str, reason: str = "") -> Optional[JobEnd]:
        """A JobEnd from Slurm's JobState (``CANCELLED by 0``) and ExitCode (``status:signal``); None while live."""
        word = state.split()[0] if state.split() else ""
        if word not in self._ENDS:
            return None
        status, _, sig = exit_code.partition(":")
        code = int(status) if status.isdigit() else None
        signum = int(sig) if sig.isdigit() and int(sig) else None
        words = f"{source}: {state}, ExitCode {exit_code}" + (f", {reason}" if reason not in ("", "None") else "")
        return JobEnd(self._ENDS[word], 128 + signum if signum else code, signum, host, words)


@register
class PBS(Scheduler):
    name = "pbs"
    directive_prefix = "#PBS"
    native_starter = "pbsdsh"
    walltime_option = "-l walltime"
    task_variable = "PBS_ARRAY_INDEX"
    # no warning_signal: PBS sends SIGTERM at the walltime and kills soon after (stop_margin_s stands in)
    _STATES = {"Q": "pending", "H": "held (waiting for the previous job)", "R": "running", "E": "exiting",
               "F": "finished", "X": "finished", "B": "running"}

    def in_job(self, env: Mapping[str, str]) -> bool:
        return bool(env.get("PBS_JOBID") and env.get("PBS_NODEFILE"))

    def allocation(self, env: Mapping[str, str], hostname: str) -> Allocation:
        pairs = parse_nodefile(_read(env["PBS_NODEFILE"], "PBS_NODEFILE"), env["PBS_NODEFILE"])
        return Allocation(self.name, env["PBS_JOBID"], [h for h, _ in pairs], [s for _, s in pairs], hostname)

    def directives(self, profile: "Profile", spec: "JobSpec") -> List[str]:
        p = profile
        out = [f"-N {spec.name[:15]}", f"-o {spec.logs}/", "-j oe"]  # PBS Pro: names of at most 15 characters
        out += [f"-J 1-{spec.tasks}"] if spec.tasks else []
        out += [f"-q {p.queue}"] if p.queue else []
        out += [f"-l walltime={p.walltime}"] if p.walltime else []
        out += [f"-P {p.group}"] if p.group else []
        return out

    def submit_command(self, profile: "Profile", script: str, after: Optional[str] = None,
                       after_ok: bool = False) -> List[str]:
        # an array job's id (123[].server) stands for all its subjobs; afterok that can never be met deletes the job
        cmd = ["qsub"] + (["-W", f"depend={'afterok' if after_ok else 'afterany'}:{after}"] if after else [])
        return cmd + list(profile.submit_args) + [str(script)]

    unreachable_words = ("cannot connect to server", "pbs_connect", "Connection refused", "Server busy")
    cancel_command = "qdel"

    def log_path(self, logs: str, name: str, job_id: str, task: Optional[int] = None) -> Optional[str]:
        sequence = job_id.split(".", 1)[0].replace("[]", "")
        if task is not None:
            return f"{logs}/{name[:15]}.o{sequence}.{task}"  # a subjob's: JOB_NAME.oSEQUENCE.INDEX
        return f"{logs}/{name[:15]}.o{sequence}"  # -o LOGS/: JOB_NAME.oSEQUENCE

    def state_command(self, job_ids: Sequence[str]) -> Optional[List[str]]:
        return ["qstat", "-x", *job_ids]  # -x: finished jobs too

    def none_known(self, proc: subprocess.CompletedProcess) -> bool:
        return "Unknown Job Id" in proc.stderr  # some jobs are gone from the server's history; the rest are listed

    def parse_states(self, stdout: str, job_ids: Sequence[str]) -> JobStates:
        """qstat's ``Job id`` column may shorten the server part (``123.pbs1`` as ``123.pbs*``): match by number.
        Finished jobs (F, X) have left the queue: ``job_ends`` tells how they ended."""
        found = {}
        for line in stdout.splitlines():
            parts = line.split()
            if len(parts) >= 5 and parts[4] not in ("F", "X"):
                for j in job_ids:
                    if short(j) == short(parts[0]):
                        found[j] = (self._STATES.get(parts[4], parts[4]), "")
        return found

    def job_ends(self, job_ids: Sequence[str]) -> Dict[str, JobEnd]:
        """``qstat -x -f``: ``Exit_status`` of a finished job (PBS Pro: 256 + N when the job was killed by
        signal N; below 0 when PBS could not start it). A job deleted before it ran has none."""
        return self.parse_ends(_output(["qstat", "-x", "-f", *job_ids]) or "", job_ids) if job_ids else {}

    def parse_ends(self, stdout: str, job_ids: Sequence[str]) -> Dict[str, JobEnd]:
        ends = {}
        for block in re.split(r"^Job Id: ", stdout, flags=re.M)[1:]:
            job = block.split()[0]
            fields = dict(re.findall(r"^\s+([\w.]+) = (.*)$", block, flags=re.M))
            status = fields.get("Exit_status", "").strip()
            match = [j for j in job_ids if short(j) == short(job)]
            if not match or fields.get("job_state") not in ("F", "X") or not re.fullmatch(r"-?\d+", status):
                continue
            code = int(status)
            host = fields.get("exec_host", "").split("/")[0]
            words = f"pbs: Exit_status {code}"
            if code >= 256:
                ends[match[0]] = JobEnd("failed", 128 + code - 256, code - 256, host, words)
            elif code < 0:
                ends[match[0]] = JobEnd("failed", None, None, host, words + " (PBS could not start the job)")
            else:
                ends[match[0]] = JobEnd("completed" if code == 0 else "failed", code,
                                        code - 128 if 128 < code < 160 else None, host, words)
        return ends


@register
class GridEngine(Scheduler):
    name = "gridengine"
    directive_prefix = "#$"
    native_starter = "qrsh"
    warning_signal = "SIGUSR2"  # -notify: SIGUSR2 before the h_rt kill; the queue's notify time sets the lead
    walltime_option = "-l h_rt"
    task_variable = "SGE_TASK_ID"
    _STATES = {"qw": "pending", "hqw": "held (waiting for the previous job)", "r": "running", "t": "starting",
               "dr": "being deleted", "Eqw": "error", "s": "suspended"}

    def in_job(self, env: Mapping[str, str]) -> bool:
        # JOB_ID is generic: with PE_HOSTFILE, or SGE_ROOT for a job without a parallel environment
        return bool(env.get("JOB_ID") and (env.get("PE_HOSTFILE") or env.get("SGE_ROOT")))

    def allocation(self, env: Mapping[str, str], hostname: str) -> Allocation:
        if not env.get("PE_HOSTFILE"):  # no parallel environment: this host, NSLOTS slots
            return Allocation(self.name, env["JOB_ID"], [hostname], [int(env.get("NSLOTS", "1") or 1)], hostname)
        pairs = parse_pe_hostfile(_read(env["PE_HOSTFILE"], "PE_HOSTFILE"), env["PE_HOSTFILE"])
        return Allocation(self.name, env["JOB_ID"], [h for h, _ in pairs], [s for _, s in pairs], hostname)

    def directives(self, profile: "Profile", spec: "JobSpec") -> List[str]:
        p = profile
        out = [f"-N {_job_name(spec.name)}", "-cwd", f"-o {spec.logs}/", "-j y", "-S /bin/bash"]
        out += ["-notify"] if spec.walltime_warning else []
        out += [f"-t 1-{spec.tasks}"] if spec.tasks else []
        out += [f"-l h_rt={p.walltime}"] if p.walltime else []
        out += [f"-q {p.queue}"] if p.queue else []
        return out

    def submit_command(self, profile: "Profile", script: str, after: Optional[str] = None,
                       after_ok: bool = False) -> List[str]:
        # -hold_jid waits for every task of an array job; Grid Engine has no afterok: the job starts however they
        # ended (keizoku tokenize-merge then checks that every share is complete)
        cmd = ["qsub", "-terse"] + (["-g", profile.group] if profile.group else [])
        cmd += ["-hold_jid", after] if after else []
        return cmd + list(profile.submit_args) + [str(script)]

    def parse_job_id(self, stdout: str) -> str:
        """``qsub -terse``: ``123`` (``123.1-4:1`` for an array job); without -terse: ``Your job 123 (...)``."""
        m = re.search(r"Your job (\d+)", stdout)
        return self._checked_id(m.group(1) if m else _last_line(stdout).split(".", 1)[0], stdout)

    unreachable_words = ("unable to contact qmaster", "unable to send message to qmaster", "commlib error",
                         "Connection refused")
    cancel_command = "qdel"

    def log_path(self, logs: str, name: str, job_id: str, task: Optional[int] = None) -> Optional[str]:
        if task is not None:
            return f"{logs}/{_job_name(name)}.o{job_id}.{task}"  # an array task's: JOB_NAME.oJOB_ID.TASK_ID
        return f"{logs}/{_job_name(name)}.o{job_id}"  # -o LOGS/ -j y: JOB_NAME.oJOB_ID

    def state_command(self, job_ids: Sequence[str]) -> Optional[List[str]]:
        return ["qstat", "-u", "*"]

    def parse_states(self, stdout: str, job_ids: Sequence[str]) -> JobStates:
        found = {}
        for line in stdout.splitlines()[2:]:  # below the header and its rule
            parts = line.split()
            if len(parts) >= 5 and parts[0] in job_ids:
                found[parts[0]] = (self._STATES.get(parts[4], parts[4]), "")
        return found

    def job_ends(self, job_ids: Sequence[str]) -> Dict[str, JobEnd]:
        """``qacct -j ID``, once Grid Engine has written the job's accounting (``reporting_params flush_time``, 15
        s by default, after its end). A job deleted before it started has no record."""
        ends = {}
        for job_id in job_ids:
            end = self.parse_qacct(_output(["qacct", "-j", job_id]) or "")
            if end is not None:
                ends[job_id] = end
        return ends

    def parse_qacct(self, stdout: str) -> Optional[JobEnd]:
        """The job's own record: the last one (with tight integration each ``qrsh -inherit`` task has a record of
        its own, written as it ends, before the job's). ``failed`` 37/38: killed at ``h_rt``; 100: ended by a
        signal; a ``deleted_by`` line (Altair/Univa Grid Engine): qdel."""
        records = [r for r in re.split(r"^=+\s*$", stdout, flags=re.M) if "exit_status" in r]
        if not records:
            return None
        fields = dict(line.split(None, 1) for line in records[-1].splitlines() if len(line.split(None, 1)) == 2)
        failed = _leading_int(fields.get("failed", "")) or 0  # "100 : assumedly after job"
        code = _leading_int(fields.get("exit_status", ""))  # "137                  (Killed)"
        signum = code - 128 if code is not None and 128 < code < 160 else None
        fields = {k: " ".join(v.split()) for k, v in fields.items()}
        words = f"qacct: failed {fields.get('failed', '?')}, exit_status {fields.get('exit_status', '?')}"
        host = fields.get("hostname", "")
        if fields.get("deleted_by", "") not in ("", "NONE"):
            return JobEnd("cancelled", code, signum, host, words + f", deleted by {fields['deleted_by']}")
        if failed in (37, 38):  # qmaster / execd enforced h_rt
            return JobEnd("timeout", code, signum, host, words)
        state = "completed" if failed == 0 and code == 0 else "failed"
        return JobEnd(state, code, signum, host, words)


@register
class Local(Scheduler):
    """No scheduler: this machine; ``keizoku submit`` runs the job script here, again after each exit 3."""

    name = "local"
    takes_days = True  # only keizoku's own stop_margin_s reads it
    stop_before_walltime = ()  # no walltime kill to stop before
    queues_jobs = False
    hosts_are_allocated = False  # KEIZOKU_HOSTS may name any machine (starter ssh or mpirun)
    task_variable = "KEIZOKU_TASK_ID"  # keizoku submit runs an array's tasks here one after another

    def in_job(self, env: Mapping[str, str]) -> bool:
        return False  # the fallback of scheduler_of, claimed by no environment

    def allocation(self, env: Mapping[str, str], hostname: str) -> Allocation:
        job_id = env.get(LOCAL_JOB_ID) or f"local-{os.getpid()}"
        return Allocation(self.name, job_id, [hostname], [os.cpu_count() or 1], hostname)

    def profile_errors(self, profile: "Profile") -> List[str]:
        errors = super().profile_errors(profile)
        if profile.nodes > 1 and profile.starter == "local":
            errors.append("nodes: scheduler local with starter local runs on this machine only (nodes: 1)")
        return errors

    def submit_command(self, profile: "Profile", script: str, after: Optional[str] = None,
                       after_ok: bool = False) -> List[str]:
        return ["bash", str(script)]


# --- walltimes --------------------------------------------------------------------------------------------------

def parse_walltime(text: str) -> int:
    """``HH:MM:SS``, ``MM:SS`` or ``D-HH:MM:SS`` as seconds (hours may pass 24 in ``HH:MM:SS``). ValueError, saying
    what to write, for anything else: minutes or seconds past 59 (``1:90:00``), hours past 23 after a day
    (``1-30:00:00``), no time at all (``00:00:00``)."""
    days, _, clock = str(text).rpartition("-")
    parts = clock.split(":")
    if not (2 <= len(parts) <= 3) or not all(p.isdigit() for p in parts) or (days and not days.isdigit()) \
            or ("-" in str(text) and len(parts) != 3):
        raise ValueError(f"{text!r} is not HH:MM:SS or D-HH:MM:SS (in a YAML file, quote it: an unquoted "
                         f"24:00:00 is read as the number 86400)")
    seconds = 0
    for p in parts:
        seconds = seconds * 60 + int(p)
    seconds += int(days or 0) * 86400
    values = [int(p) for p in parts]
    if any(v > 59 for v in values[1:]) or (days and values[0] > 23):
        raise ValueError(f"{text!r} has a field out of range (minutes and seconds 0-59, hours 0-23 after a day); "
                         f"write {format_walltime(seconds)}")
    if seconds == 0:
        raise ValueError(f"{text!r} is no time at all; give the job a time limit such as 24:00:00")
    return seconds


def format_walltime(seconds: int) -> str:
    """``HH:MM:SS``, hours past 24 included (``1-00:00:00`` is ``24:00:00``)."""
    return f"{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# --- reading allocations ----------------------------------------------------------------------------------------

def detect_allocation(env: Mapping[str, str] = os.environ, hostname: Optional[str] = None) -> Allocation:
    """The allocation this process runs in, from the scheduler's variables (see the module docstring)."""
    scheduler = scheduler_of(env)
    alloc = scheduler.allocation(env, hostname or socket.gethostname())
    alloc.first_listed = alloc.hosts[0] if alloc.hosts else ""
    _batch_host_first(alloc)
    chosen = env.get("KEIZOKU_HOSTS", "").replace(",", " ").split()
    if chosen:
        _restrict(alloc, chosen, scheduler.hosts_are_allocated)
    return alloc


def parse_pe_hostfile(text: str, source: str = "PE_HOSTFILE") -> List[Tuple[str, int]]:
    """``host slots queue processors`` per line; a host listed for several queues is merged, order kept."""
    merged: Dict[str, int] = {}
    for n, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 2 or not parts[1].isdigit():
            raise AllocationError(f"{source}:{n}: expected 'host slots queue processors', got {line!r}")
        merged[parts[0]] = merged.get(parts[0], 0) + int(parts[1])
    if not merged:
        raise AllocationError(f"{source}: no hosts listed")
    return list(merged.items())


def parse_nodefile(text: str, source: str = "PBS_NODEFILE") -> List[Tuple[str, int]]:
    """One host per line, repeated once per slot (PBS, OpenMPI/MPICH machine files): hosts in first-seen
    order with their line counts. ``host slots=N`` lines (OpenMPI hostfile syntax) count N."""
    counts: Dict[str, int] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        slots = 1
        for p in parts[1:]:
            if p.startswith("slots="):
                if not p[6:].isdigit():
                    raise AllocationError(f"{source}:{n}: bad slots in {line!r}")
                slots = int(p[6:])
        counts[parts[0]] = counts.get(parts[0], 0) + slots
    if not counts:
        raise AllocationError(f"{source}: no hosts listed")
    return list(counts.items())


_BRACKET = re.compile(r"\[([^\]]*)\]")


def expand_nodelist(spec: str) -> List[str]:
    """Slurm's compressed host list (``gpu[01-03,7],login1``, also ``a[1-2]b[3-4]``), expanded in order,
    keeping zero padding, as ``scontrol show hostnames`` prints it."""
    out: List[str] = []
    depth, start = 0, 0
    for i, ch in enumerate(spec + ","):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            item = spec[start:i].strip()
            start = i + 1
            if item:
                out.extend(_expand_one(item, spec))
    if depth != 0:
        raise AllocationError(f"SLURM_JOB_NODELIST: unbalanced brackets in {spec!r}")
    return out


def _expand_one(item: str, whole: str) -> List[str]:
    m = _BRACKET.search(item)
    if not m:
        return [item]
    head, tail = item[:m.start()], item[m.end():]
    names = []
    for part in m.group(1).split(","):
        lo, _, hi = part.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise AllocationError(f"SLURM_JOB_NODELIST: bad range {part!r} in {whole!r}")
        width = len(lo)
        for k in range(int(lo), int(hi or lo) + 1):
            names.extend(head + str(k).zfill(width) + rest for rest in _expand_one(tail, whole) or [""])
    return names


def slurm_task_counts(spec: str, var: str = "SLURM_TASKS_PER_NODE") -> List[int]:
    """Slurm's tasks per node, ``2(x3),1`` -> [2, 2, 2, 1]."""
    out: List[int] = []
    for part in filter(None, spec.split(",")):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            raise AllocationError(f"{var}: cannot read {spec!r}")
        out += [int(m.group(1))] * int(m.group(2) or 1)
    return out


def one_line(text: str) -> str:
    """A command's message as one line: its non-empty lines joined with '; ' (without Grid Engine's 'Exiting.')."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip() and line.strip() != "Exiting."]
    return "; ".join(lines)


def _run(command: List[str], timeout: float = 60) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise QueryError(f"{command[0]}: command not found") from None
    except (OSError, subprocess.SubprocessError) as e:
        raise QueryError(f"{command[0]}: {e}") from None


def _output(command: List[str], timeout: float = 60) -> Optional[str]:
    """A command's stdout if it succeeded, else None (never raises)."""
    try:
        proc = _run(command, timeout)
    except QueryError:
        return None
    return proc.stdout if proc.returncode == 0 else None


def _leading_int(text: str) -> Optional[int]:
    m = re.match(r"\s*(\d+)", text)
    return int(m.group(1)) if m else None


def expand_first(spec: str) -> str:
    """The first host of a Slurm node list (``node[1-2]`` -> ``node1``), or '' if it cannot be read."""
    try:
        hosts = expand_nodelist(spec)
    except AllocationError:
        return ""
    return hosts[0] if hosts else ""


def _last_line(text: str) -> str:
    return text.strip().splitlines()[-1].strip() if text.strip() else ""


def _or(items: Sequence[str]) -> str:
    """``a, b or c``."""
    return " or ".join(filter(None, [", ".join(items[:-1]), *items[-1:]]))


def _job_name(name: str) -> str:
    """A Grid Engine job name: no '/', ':', '@', ...; starting with a letter."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
    return name if name[:1].isalpha() else f"k{name}"


def _read(path: Optional[str], var: str) -> str:
    if not path:
        raise AllocationError(f"{var} is not set")
    try:
        with open(path) as f:
            return f.read()
    except OSError as e:
        raise AllocationError(f"{var}={path}: cannot read ({e.strerror})") from None


def _batch_host_first(alloc: Allocation) -> None:
    """Node rank 0 (which hosts the rendezvous) must run where the driver holds the port: the batch host."""
    names = [short(h) for h in alloc.hosts]
    if short(alloc.batch_host) in names:
        i = names.index(short(alloc.batch_host))
        alloc.hosts = alloc.hosts[i:i + 1] + alloc.hosts[:i] + alloc.hosts[i + 1:]
        if alloc.slots:
            alloc.slots = alloc.slots[i:i + 1] + alloc.slots[:i] + alloc.slots[i + 1:]


def _restrict(alloc: Allocation, chosen: List[str], check: bool) -> None:
    if check:
        known = {short(h) for h in alloc.hosts}
        for h in chosen:
            if short(h) not in known:
                raise AllocationError(f"KEIZOKU_HOSTS: {h!r} is not in this job's allocation "
                                      f"({', '.join(alloc.hosts)})")
    by_name = dict(zip((short(h) for h in alloc.hosts), alloc.slots))
    alloc.hosts = list(chosen)
    alloc.slots = [by_name.get(short(h), 1) for h in chosen]
