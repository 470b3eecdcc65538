"""The run-directory contract (keizoku.rundir): publishing by rename, complete checkpoints of both engines, pruning
that a kill at any instant cannot turn into a complete-looking partial checkpoint, exit codes."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from keizoku import rundir
from keizoku.rundir import ExitCode, RunDir


def test_staging_names_are_hidden_beside_the_final_name_and_keep_its_suffixes(tmp_path):
    final = tmp_path / "out" / "trace.json.gz"
    staged = rundir.staging_path(final)
    assert staged.parent == final.parent and staged.name.startswith(".tmp") and staged.name.endswith(".trace.json.gz")
    assert rundir.staging_path(final, tag="") != staged  # ranks writing one checkpoint share a name without a pid
    assert rundir.staging_path(final, tag="").name == ".tmp.trace.json.gz"


def test_write_atomic_replaces_whole_files_and_leaves_nothing_on_failure(tmp_path):
    path = tmp_path / "a" / "config.yaml"
    rundir.write_atomic(path, "one\n", mode=0o640)
    assert path.read_text() == "one\n" and path.stat().st_mode & 0o777 == 0o640
    rundir.write_atomic(path, b"two\n")
    assert path.read_bytes() == b"two\n"

    with pytest.raises(TypeError):
        rundir.write_atomic(path, 3)  # not str or bytes: nothing half-written
    assert path.read_text() == "two\n" and sorted(p.name for p in path.parent.iterdir()) == ["config.yaml"]


def test_publish_refuses_to_overwrite_unless_asked(tmp_path):
    staged, final = tmp_path / ".tmp1.d", tmp_path / "d"
    staged.mkdir()
    (staged / "x").write_text("new")
    final.mkdir()
    (final / "x").write_text("old")
    with pytest.raises(FileExistsError):
        rundir.publish(staged, final)
    assert (final / "x").read_text() == "old"
    rundir.publish(staged, final, replace=True)
    assert (final / "x").read_text() == "new" and not staged.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["d"]  # the replaced directory is gone, not left as debris


def _torch_checkpoint(run: Path, step: int, files: int = 3) -> Path:
    final = rundir.checkpoint_path(run, step)
    staged = rundir.staging_path(final, tag="")
    staged.mkdir(parents=True)
    for i in range(files):
        (staged / f"__{i}_0.distcp").write_bytes(os.urandom(64))
    return rundir.commit_checkpoint(staged, final, step)


def test_only_committed_torch_checkpoints_count(tmp_path):
    run = tmp_path / "run"
    assert rundir.latest_checkpoint(run) is None
    first = _torch_checkpoint(run, 10)
    assert first.name == "step_00000010" and rundir.is_committed(first)
    assert json.loads((first / rundir.COMMIT).read_text())["step"] == 10
    (RunDir(run).checkpoints / "step_00000020").mkdir()  # no commit marker: not a checkpoint
    (RunDir(run).checkpoints / ".tmp.step_00000030").mkdir()  # a killed save: hidden
    assert [(c.step, c.engine) for c in rundir.committed_checkpoints(run)] == [(10, "torch")]
    assert rundir.find_checkpoint(run, 20) is None and rundir.find_checkpoint(run, 10).path == first
    rundir.remove_staged(RunDir(run).checkpoints)
    assert not (RunDir(run).checkpoints / ".tmp.step_00000030").exists()
    assert (RunDir(run).checkpoints / "step_00000020").exists()  # not keizoku's to delete


def test_megatron_checkpoints_are_what_its_tracker_commits(tmp_path):
    run = tmp_path / "run"
    root = RunDir(run).checkpoints
    root.mkdir(parents=True)
    (root / rundir.MEGATRON_TRACKER).write_text("20\n")
    assert rundir.latest_checkpoint(run) is None  # a tracker without its checkpoint
    for step in (10, 20, 30):  # 30: a save in flight, not yet named by the tracker
        (root / f"iter_{step:07d}").mkdir()
    assert [(c.step, c.engine) for c in rundir.committed_checkpoints(run)] == [(10, "megatron"), (20, "megatron")]
    assert rundir.latest_checkpoint(run, engine="megatron").path == root / "iter_0000020"
    assert rundir.latest_checkpoint(run, engine="torch") is None
    assert rundir.checkpoint_path(run, 30, "megatron") == root / "iter_0000030"


def test_prune_keeps_the_newest(tmp_path):
    run = tmp_path / "run"
    for step in (10, 20, 30, 40):
        _torch_checkpoint(run, step)
    removed = rundir.prune_checkpoints(run, keep_last=2)
    assert [p.name for p in removed] == ["step_00000010", "step_00000020"]
    assert sorted(p.name for p in RunDir(run).checkpoints.iterdir()) == ["step_00000030", "step_00000040"]


PRUNER = """
import sys
from keizoku import rundir
print("ready", flush=True)
sys.stdin.readline()
rundir.prune_checkpoints(sys.argv[1], keep_last=1)
print("pruned", flush=True)
"""


def _start_pruner(run) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", PRUNER, str(run)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.stdin.write("go\n")
    proc.stdin.flush()
    return proc


def test_a_kill_during_pruning_never_leaves_a_partial_checkpoint_that_looks_complete(tmp_path):
    """SIGKILL at random instants while old checkpoints (many files each) are pruned: every checkpoint that still
    looks complete is whole, and the next prune leaves exactly the newest. The instants are drawn over the time a
    whole prune takes on this machine (measured first), so that a loaded machine still lands kills inside it."""
    def checkpoints(run):
        for step in (10, 20, 30):
            _torch_checkpoint(run, step, files=400)

    checkpoints(tmp_path / "timed")
    proc = _start_pruner(tmp_path / "timed")
    start = time.perf_counter()
    assert proc.stdout.readline().strip() == "pruned"
    prune_seconds = time.perf_counter() - start
    proc.wait()
    rng = random.Random(0)
    interrupted = trials = 0
    while trials < 12 or interrupted < 4 and trials < 40:
        run = tmp_path / f"run{trials}"
        checkpoints(run)
        proc = _start_pruner(run)
        time.sleep(rng.uniform(0, prune_seconds))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        for c in rundir.committed_checkpoints(run):
            assert len(list(c.path.glob("*.distcp"))) == 400, (trials, c.path)
        interrupted += any(p.name.startswith(".tmp") for p in RunDir(run).checkpoints.iterdir())
        rundir.remove_staged(RunDir(run).checkpoints)
        rundir.prune_checkpoints(run, keep_last=1)
        assert sorted(p.name for p in RunDir(run).checkpoints.iterdir()) == ["step_00000030"]
        trials += 1
    assert interrupted >= 3, f"only {interrupted} of {trials} kills landed inside the deletion"


def test_exit_codes():
    assert (ExitCode.OK, ExitCode.FAILED, ExitCode.CONFIG, ExitCode.STOPPED) == (0, 1, 2, 3)
    assert ExitCode.of_returncode(-signal.SIGKILL) == 137 and ExitCode.of_returncode(3) == 3
    assert [ExitCode.outcome(s) for s in (0, 3, 1, 137)] == ["completed", "stopped after saving", "failed", "failed"]


def test_rundir_is_standard_library_python_3_8():
    """The launch driver imports it on a compute node's bare python3 (RHEL 9: 3.9; checked as 3.8)."""
    import ast

    tree = ast.parse(Path(rundir.__file__).read_text(), feature_version=(3, 8))
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert imported <= set(sys.stdlib_module_names) | {"__future__"}


def test_a_kept_megatron_phase_end_outlives_bridges_pruning(tmp_path):
    """engine megatron: the end of a phase is hard-linked into RUN_DIR/phase-ends with a commit marker; when Bridge
    prunes its own iter_ directory the kept one is still a complete checkpoint, same files."""
    import shutil

    from keizoku.rundir import MEGATRON_TRACKER, committed_checkpoints, keep_megatron_checkpoint, kept_reason

    ckpts = tmp_path / "checkpoints"
    for step in (10, 20):
        (ckpts / f"iter_{step:07d}").mkdir(parents=True)
        (ckpts / f"iter_{step:07d}/__0_0.distcp").write_bytes(bytes([step]) * 1000)
    (ckpts / MEGATRON_TRACKER).write_text("20")
    kept = keep_megatron_checkpoint(tmp_path, 20, "the end of phase main")
    assert kept == tmp_path / "phase-ends/iter_0000020" and kept_reason(kept) == "the end of phase main"
    assert (kept / "__0_0.distcp").stat().st_ino == (ckpts / "iter_0000020/__0_0.distcp").stat().st_ino  # linked
    assert [(c.step, c.path) for c in committed_checkpoints(tmp_path, "megatron")] == [
        (10, ckpts / "iter_0000010"), (20, ckpts / "iter_0000020")]
    (ckpts / "iter_0000030").mkdir()
    (ckpts / MEGATRON_TRACKER).write_text("30")
    shutil.rmtree(ckpts / "iter_0000010")
    shutil.rmtree(ckpts / "iter_0000020")  # Bridge's most_recent_k: 1
    assert [(c.step, c.path) for c in committed_checkpoints(tmp_path, "megatron")] == [(20, kept), (30, ckpts /
                                                                                                   "iter_0000030")]
    assert (kept / "__0_0.distcp").read_bytes() == bytes([20]) * 1000
    assert keep_megatron_checkpoint(tmp_path, 20, "again") == kept  # done already: left as it is
