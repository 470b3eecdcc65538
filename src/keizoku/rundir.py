"""The run directory: what a keizoku run writes where, how a writer publishes, how a reader knows what is complete,
and what a keizoku process's exit status means.

Layout of ``RUN_DIR`` (``run_dir:`` in the config; ``RunDir`` below names each path)::

    config.yaml                 the resolved configuration, rewritten at every start of training
    config-history.jsonl        one line per start: time, command line, settings changed (keizoku.config.save_resolved;
                                a run that has trained refuses changes to what it trains without --allow-changes)
    base-model/                 what export needs of model.hf_path, copied at the start of a run (small files
                                only: config.json, generation_config.json; tokenizer/: the tokenizer's files), so
                                that a run is exported and resumed after model.hf_path is moved or deleted
                                (keizoku.base_model)
    metrics.jsonl               one JSON record a line, appended: {"kind": "train" | "eval", "step": N, ...}
    tensorboard/                TensorBoard events (logging.tensorboard)
    checkpoints/
      step_00001000/            engine torch: DCP shards, rng_rank{R}.pt, trainer_state.json, keizoku-commit.json
                                (its "keep": the end of a phase, never pruned)
      iter_0001000/             engine megatron: Megatron-Bridge's torch_dist checkpoint
      latest_checkpointed_iteration.txt   engine megatron: Megatron's own commit record (below)
    phase-ends/iter_0001000/    engine megatron: the last checkpoint of a phase, kept (hard links to the files of
                                Bridge's own, which Bridge prunes; keep_megatron_checkpoint), with a commit marker
    data-cache/                 megatron-core's sample-index caches (data.cache_dir)
    profile/                    logging.profile_step: each profiled rank's trace and operator table
    megatron.json               engine megatron: what export needs besides config.yaml
    pretrained-megatron/        engine megatron: the Megatron import of model.hf_path (megatron.import_dir)
    jobs.jsonl                  keizoku submit: one line per submitted job (id, chain link, dependency)
    jobs/JOB_ID.json            the launch driver: hosts, world size, start, end, exit status of each job; its
                                host, pid and heartbeat (every 30 s while it runs); the failed rank's detail
    launch/                     the driver's stop files and MPI hostfiles, per job; failure.JOB_ID.nodeR.json:
                                what a node's agent saw of a rank that failed
    submit/SID.sh, SID.plan.json (+ SID.launch/ with --container)   what keizoku submit wrote
    logs/                       the scheduler's output of each job
    loss.png                    keizoku quickstart: the losses, plotted
    report.html                 keizoku report: the run's plots and table, one self-contained HTML page (keizoku.report)
    eval/step_00001000/         keizoku eval (eval.downstream): results.json (lm-eval's), hf/ (the export it read);
                                eval/jobs.jsonl: submitted eval jobs; logs/eval-step_00001000.log: a local eval's output
    schedule.json, schedule.png the run's segments (phases, extensions) and its LR at every step, as planned at the
                                last start or extension (keizoku.schedule.RunPlan.to_json)

An export (``keizoku export RUN_DIR --out DIR``) is written where ``--out`` says, never inside ``checkpoints/``,
into a new or empty DIR, replacing only an earlier export and only with ``--overwrite``
(``engines.check_export_target``); ``DIR/keizoku_export.json`` (``EXPORT_RECORD``) names the run, checkpoint and
step it came from.

**Publishing.** Every file or directory a keizoku process writes for others to read is written under a hidden
staging name in its destination directory (``staging_path``) and renamed into place (``publish``): a rename
within one directory is atomic on POSIX file systems, Lustre and GPFS included, so a reader — or the run that
resumes after a crash — sees the old version or the new one, never part of one. A staging name starts with
``.tmp``, so nothing that lists final names (checkpoints, datasets) ever sees one.

**Complete checkpoints.** Engine torch: a checkpoint directory is complete when it holds ``keizoku-commit.json``
(``COMMIT``), written last into the staging directory — after every rank's shards and the trainer state are on
disk — and published with it by the rename, so the marker appears under the final name at the instant the whole
checkpoint does. Pruning withdraws the commit first: the directory is renamed out of the way (to a staging name)
in one step, then deleted, so a kill at any instant leaves either the complete checkpoint under its final name or
hidden debris that the next prune removes (unlinking the marker first instead would leave, for the instant before
the rename, a marker-less directory under the final name that nothing can tell from a foreign one).
Engine megatron: Megatron writes ``latest_checkpointed_iteration.txt`` (``MEGATRON_TRACKER``) once a save,
asynchronous ones included, has finished, and starts the next save only after that; so the ``iter_NNNNNNN`` it
names, and every older one still there, are complete (Megatron-Bridge prunes the older ones itself,
``checkpoint.keep_last``; keizoku never deletes them).

**Exit status** (``ExitCode``) of ``keizoku train``, the launch agent and driver, and so of a job script, which
``exec``s the driver: 0 done; 1 failed; 2 bad configuration or arguments; 3 stopped on request after saving a
checkpoint (or, engine megatron under a launcher, at the end of a phase whose successor is its own Bridge run) —
run again, or let the next job of a chain run, to resume; 130 interrupted (Ctrl-C); 128 + N killed
by signal N.

Standard library only, Python >= 3.8: the launch driver reads this module on a compute node's own ``python3``,
outside the training container (``keizoku.launch.driver``).
"""

from __future__ import annotations

import enum
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Union

PathLike = Union[str, "os.PathLike[str]"]

COMMIT = "keizoku-commit.json"
EXPORT_RECORD = "keizoku_export.json"
MEGATRON_TRACKER = "latest_checkpointed_iteration.txt"
_TORCH_CHECKPOINT = re.compile(r"^step_(\d{8})$")
_MEGATRON_CHECKPOINT = re.compile(r"^iter_(\d{7})$")
_STAGING = ".tmp"


class ExitCode(enum.IntEnum):
    OK = 0
    FAILED = 1
    CONFIG = 2  # bad configuration or arguments: nothing ran
    STOPPED = 3  # stopped on request (walltime warning, stop file) after saving: run again to resume
    INTERRUPTED = 130  # Ctrl-C

    @staticmethod
    def of_returncode(returncode: int) -> int:
        """A child's ``Popen.returncode`` as a process exit status: killed by signal N (-N) is 128 + N."""
        return 128 - returncode if returncode < 0 else returncode

    @staticmethod
    def outcome(status: int) -> str:
        """What ``keizoku status`` calls a job that ended with ``status``."""
        return {ExitCode.OK: "completed", ExitCode.STOPPED: "stopped after saving"}.get(status, "failed")


class RunDir:
    """The paths of one run directory (see the module docstring)."""

    def __init__(self, path: PathLike):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def base_model(self) -> Path:
        return self.path / "base-model"

    @property
    def history(self) -> Path:
        return self.path / "config-history.jsonl"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.path / "tensorboard"

    def where(self, checkpoint_interval: int, keep_last: int, save_at_end: bool, tensorboard: bool) -> List[str]:
        """The first lines a training start prints: where everything of the run goes."""
        when = [f"every {checkpoint_interval} steps"] * bool(checkpoint_interval) + ["at the end"] * save_at_end
        every = " and ".join(when) or "never"
        lines = [f"run directory {self.path.absolute()} (config.yaml, {self.history.name})",
                 f"metrics {self.metrics.absolute()}; checkpoints {self.checkpoints.absolute()} ({every}, the newest "
                 f"{keep_last} kept)"]
        if tensorboard:
            lines.append(f"TensorBoard: tensorboard --logdir {self.tensorboard.absolute()}")
        return lines

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def phase_ends(self) -> Path:
        return self.path / "phase-ends"

    @property
    def data_cache(self) -> Path:
        return self.path / "data-cache"

    @property
    def profile(self) -> Path:
        return self.path / "profile"

    @property
    def megatron_info(self) -> Path:
        return self.path / "megatron.json"

    @property
    def megatron_import(self) -> Path:
        return self.path / "pretrained-megatron"

    @property
    def job_list(self) -> Path:
        return self.path / "jobs.jsonl"

    def job_record(self, job_id: str) -> Path:
        return self.job_records / f"{safe_name(job_id)}.json"

    @property
    def job_records(self) -> Path:
        return self.path / "jobs"

    @property
    def launch(self) -> Path:
        return self.path / "launch"

    def stop_file(self, job_id: str) -> Path:
        return self.launch / f"stop.{safe_name(job_id)}"

    def hostfile(self, job_id: str) -> Path:
        return self.launch / f"hostfile.{safe_name(job_id)}"

    @property
    def submit(self) -> Path:
        return self.path / "submit"

    def job_script(self, sid: str) -> Path:
        return self.submit / f"{sid}.sh"

    def launch_plan(self, sid: str) -> Path:
        return self.submit / f"{sid}.plan.json"

    def driver_copy(self, sid: str) -> Path:
        return self.submit / f"{sid}.launch"

    @property
    def logs(self) -> Path:
        return self.path / "logs"


def safe_name(text: str) -> str:
    """``text`` as a file name: anything but letters, digits and ``-_.`` becomes ``_`` (job ids such as PBS's)."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text)


# --- publishing ------------------------------------------------------------------------------------------------

def staging_path(final: PathLike, tag: Optional[str] = None) -> Path:
    """Where ``final`` is written before ``publish``: a hidden name beside it that keeps its suffixes (torch
    compresses a ``.gz`` trace by its name). ``tag`` tells concurrent writers apart — by default this process's
    id; the ranks that write one checkpoint together pass the same tag (``""``)."""
    final = Path(final)
    return final.with_name(f"{_STAGING}{os.getpid() if tag is None else tag}.{final.name}")


def publish(staged: PathLike, final: PathLike, replace: bool = False) -> Path:
    """Rename the staged file or directory to ``final``, after flushing it to disk. An existing ``final`` is an
    error unless ``replace``; a replaced directory is moved out of the way first (``discard``)."""
    staged, final = Path(staged), Path(final)
    _fsync(staged)
    if final.is_dir() and not final.is_symlink():
        if not replace:
            raise FileExistsError(f"{final}: exists")
        discard(final)
    elif final.exists() and not replace:
        raise FileExistsError(f"{final}: exists")
    os.replace(staged, final)
    _fsync(final.parent)
    return final


def write_atomic(path: PathLike, data: Union[str, bytes], mode: Optional[int] = None) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` through a staging file, creating its directory; ``mode``: its
    permission bits. An existing file is replaced."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        if mode is not None:
            os.chmod(tmp, mode)
        publish(tmp, path, replace=True)
    except BaseException:
        _remove(tmp)
        raise
    return path


def discard(path: PathLike) -> None:
    """Remove a file or directory so that no reader ever sees part of it under its name: renamed to a staging
    name first (atomic), then deleted."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    trash = staging_path(path, f"{os.getpid()}-{time.monotonic_ns()}")
    os.replace(path, trash)
    _fsync(path.parent)
    _remove(trash)


def remove_staged(directory: PathLike) -> None:
    """Delete what writers left under staging names in ``directory`` (a killed save, an interrupted discard);
    only call it where no writer can be at work (e.g. before a run's first save)."""
    directory = Path(directory)
    if directory.is_dir():
        for p in directory.iterdir():
            if p.name.startswith(_STAGING):
                _remove(p)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def _fsync(path: Path) -> None:
    """Flush a file, or a directory's entries, to disk (best effort: some file systems refuse a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --- checkpoints ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Checkpoint:
    step: int
    path: Path
    engine: str  # torch | megatron


def checkpoint_path(run_dir: PathLike, step: int, engine: str = "torch") -> Path:
    """Where the checkpoint of ``step`` lives (complete or not)."""
    name = f"step_{step:08d}" if engine == "torch" else f"iter_{step:07d}"
    return RunDir(run_dir).checkpoints / name


def commit_checkpoint(staged: PathLike, final: PathLike, step: int, engine: str = "torch",
                      keep: Optional[str] = None) -> Path:
    """Write the commit marker into a fully written staging directory, then publish it as ``final`` (an existing
    checkpoint of that name is replaced, as a run restarted with ``checkpoint.resume: none`` saves anew). ``keep``:
    why pruning must never remove it (the end of a phase), recorded in the marker."""
    record = {"step": step, "engine": engine, "committed": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if keep:
        record["keep"] = keep
    marker = Path(staged) / COMMIT
    with open(marker, "w") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return publish(staged, final, replace=True)


def is_committed(path: PathLike) -> bool:
    return (Path(path) / COMMIT).is_file()


def committed_checkpoints(run_dir: PathLike, engine: Optional[str] = None) -> List[Checkpoint]:
    """Every complete checkpoint of the run, oldest first: ``engine``'s, or either's (see the module docstring)."""
    root = RunDir(run_dir).checkpoints
    try:
        names = os.listdir(root)
    except OSError:
        return []
    found = []
    tracked = _megatron_tracked(root)
    for name in names:
        m = _TORCH_CHECKPOINT.match(name)
        if m and is_committed(root / name):
            found.append(Checkpoint(int(m.group(1)), root / name, "torch"))
        m = _MEGATRON_CHECKPOINT.match(name)
        if m and tracked is not None and int(m.group(1)) <= tracked and (root / name).is_dir():
            found.append(Checkpoint(int(m.group(1)), root / name, "megatron"))
    kept = RunDir(run_dir).phase_ends  # engine megatron's kept phase ends, where Bridge's pruning does not look
    seen = {(c.step, c.engine) for c in found}
    for name in os.listdir(kept) if kept.is_dir() else ():
        m = _MEGATRON_CHECKPOINT.match(name)
        if m and is_committed(kept / name) and (int(m.group(1)), "megatron") not in seen:
            found.append(Checkpoint(int(m.group(1)), kept / name, "megatron"))
    return sorted((c for c in found if engine in (None, c.engine)), key=lambda c: (c.step, c.engine))


def latest_checkpoint(run_dir: PathLike, engine: Optional[str] = None) -> Optional[Checkpoint]:
    """The newest complete checkpoint (of ``engine``), if any."""
    done = committed_checkpoints(run_dir, engine)
    return done[-1] if done else None


def find_checkpoint(run_dir: PathLike, step: Optional[int] = None,
                    engine: Optional[str] = None) -> Optional[Checkpoint]:
    """The complete checkpoint of ``step`` (None: the newest; of ``engine``, or either's), if there is one."""
    if step is None:
        return latest_checkpoint(run_dir, engine)
    return next((c for c in committed_checkpoints(run_dir, engine) if c.step == step), None)


def kept_reason(path: PathLike) -> Optional[str]:
    """Why a complete checkpoint is kept whatever ``checkpoint.keep_last`` says (its marker's ``keep``), or None."""
    try:
        return json.loads((Path(path) / COMMIT).read_text()).get("keep")
    except (OSError, ValueError, AttributeError):
        return None


def keep_checkpoint(path: PathLike, reason: str) -> None:
    """Mark a complete engine-torch checkpoint as kept (``keizoku extend``: the end of the run it extends). The
    marker is replaced by a rename: the checkpoint stays complete at every instant."""
    marker = Path(path) / COMMIT
    record = json.loads(marker.read_text())
    record["keep"] = reason
    write_atomic(marker, json.dumps(record) + "\n")


def keep_megatron_checkpoint(run_dir: PathLike, step: int, reason: str) -> Path:
    """Engine megatron: keep the complete checkpoint of ``step`` (the end of a phase) whatever Bridge's pruning does.
    Bridge removes every ``iter_*`` under RUN_DIR/checkpoints but its newest ``checkpoint.keep_last``, so the kept
    copy lives in RUN_DIR/phase-ends: the same files hard-linked (no data copied; a file of the original that Bridge
    deletes stays here), a commit marker with ``keep`` written last, published by rename."""
    source = checkpoint_path(run_dir, step, "megatron")
    final = RunDir(run_dir).phase_ends / source.name
    if is_committed(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    staged = staging_path(final)
    discard(staged)
    try:
        shutil.copytree(source, staged, copy_function=os.link)
    except OSError:  # another file system than the run's: a copy
        discard(staged)
        shutil.copytree(source, staged)
    return commit_checkpoint(staged, final, step, engine="megatron", keep=reason)


def prune_checkpoints(run_dir: PathLike, keep_last: int) -> List[Path]:
    """Discard all but the newest ``keep_last`` complete engine-torch checkpoints, never one marked kept (the end of
    a phase: ``kept_reason``); returns what was removed."""
    torch_done = committed_checkpoints(run_dir, "torch")
    old = [c for c in (torch_done[:-keep_last] if keep_last > 0 else torch_done) if not kept_reason(c.path)]
    for c in old:
        discard(c.path)
    return [c.path for c in old]


def _megatron_tracked(root: Path) -> Optional[int]:
    """The iteration Megatron's tracker names, if its checkpoint directory is there."""
    try:
        text = (root / MEGATRON_TRACKER).read_text().strip()
    except OSError:
        return None
    if not text.isdigit() or not (root / f"iter_{int(text):07d}").is_dir():
        return None
    return int(text)


# --- JSON-lines files (metrics.jsonl, jobs.jsonl) --------------------------------------------------------------

def append_jsonl(path: PathLike, record: dict) -> None:
    """Append one record as one line; a single short write, so concurrent appenders do not interleave."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_jsonl(path: PathLike) -> List[dict]:
    """The records of a JSON-lines file (none if it is missing), skipping a line a crash cut short."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out
