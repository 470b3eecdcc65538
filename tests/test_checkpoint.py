"""Asynchronous, crash-safe checkpoints (engine: torch) through real `keizoku train` processes on the CPU: a kill at
any instant of a save in the background leaves the last complete checkpoint to resume from exactly, a stop waits
for the save in flight, rank 0 commits only once every rank has written, and saving in the background writes the
same state as saving before training goes on.

The instants are chosen with keizoku's test hook (``KEIZOKU_TEST_CHECKPOINT_HOOK``, ``checkpoint._test_hook``):
the process kills itself, or pauses, at a named phase of one save; DCP itself runs unchanged."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import keizoku, tiny_llama_and_data
from test_train import _wait_for, config, final_weights

from keizoku.engines.torch.checkpoint import TEST_HOOK_ENV
from keizoku.rundir import committed_checkpoints, read_jsonl

STEPS, INTERVAL = 20, 5
# every checkpoint kept, no evaluation: the runs compare checkpoints, and run quickly
COMMON = dict(train__max_steps=STEPS, checkpoint__interval=INTERVAL, checkpoint__keep_last=STEPS // INTERVAL,
              eval__interval=0)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_llama_and_data(tmp_path_factory.mktemp("checkpoint"))


@pytest.fixture(scope="module")
def whole(setup, tmp_path_factory) -> Path:
    """An uninterrupted run, saving in the background every INTERVAL steps."""
    run = tmp_path_factory.mktemp("whole") / "run"
    keizoku("train", config(setup, run, **COMMON), "eval.at_start=false")
    return run


def hooked(spec: str, **more) -> dict:
    return {**os.environ, TEST_HOOK_ENV: spec, **more}


def saved_steps(run: Path) -> list[int]:
    return [c.step for c in committed_checkpoints(run, "torch")]


def assert_same_weights(run: Path, expected: Path) -> None:
    a, b = final_weights(expected), final_weights(run)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("phase", ["writing", "commit"])
def test_kill_during_a_save_resumes_from_the_last_complete_checkpoint(setup, whole, tmp_path, phase):
    """kill -9 in the middle of step 15's write, and after every rank's write but before the commit: steps 5 and
    10 stay complete, 15 is hidden debris, and the rerun ends with the uninterrupted weights. (A kill while staging,
    before any write, leaves less: the same debris without shards; measured equal, left out for the suite's time.)"""
    run = tmp_path / "run"
    cfg = config(setup, run, **COMMON)
    proc = keizoku("train", cfg, "eval.at_start=false", check=False, env=hooked(f"15:{phase}:kill"))
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    assert saved_steps(run) == [5, 10]
    debris = run / "checkpoints/.tmp.step_00000015"
    assert debris.is_dir() and not (run / "checkpoints/step_00000015").exists()
    assert (debris / ".metadata").exists() == (phase == "commit")  # DCP's own record is written last, by rank 0
    out = keizoku("train", cfg, "eval.at_start=false").stdout
    assert "resumed from" in out and "step_00000010" in out
    assert not debris.exists()
    assert saved_steps(run) == [5, 10, 15, 20]
    assert_same_weights(run, whole)


def test_sigterm_while_a_save_is_in_flight_waits_saves_and_resumes(setup, whole, tmp_path):
    """The write of step 5 pauses 4 s; SIGTERM meanwhile: the run finishes the step, publishes step 5, saves the
    stop step, exits 3, and the resumed run ends with the uninterrupted weights."""
    run = tmp_path / "run"
    cfg = config(setup, run, **COMMON)
    proc = _start_with(cfg, hooked("5:writing:sleep=4"))
    _wait_for(lambda: (run / "checkpoints/.tmp.step_00000005").exists(), proc, "the save of step 5")
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 3, out
    steps = saved_steps(run)
    assert len(steps) == 2 and steps[0] == 5 and 5 < steps[1] < 10, steps
    assert f"saved step {steps[1]}" in out
    assert not list((run / "checkpoints").glob(".tmp*"))  # nothing half-published
    keizoku("train", cfg, "eval.at_start=false")
    assert_same_weights(run, whole)


def test_saving_in_the_background_writes_what_saving_in_place_writes(setup, whole, tmp_path):
    """Training goes on while a save is written (the write of step 5 is held mid-way until training has logged step
    7), yet every checkpoint — model, optimizer, trainer state — equals the one a run that saves before going on
    (``checkpoint.background=false``) writes."""
    paused = tmp_path / "paused"
    go = tmp_path / "go"
    proc = _start_with(config(setup, paused, **COMMON), hooked(f"5:writing:until={go}"))
    logged = lambda: [r["step"] for r in read_jsonl(paused / "metrics.jsonl") if r.get("kind") == "train"]  # noqa: E731
    _wait_for(lambda: max(logged(), default=0) >= 7, proc, "step 7 while step 5 is being written")
    assert not (paused / "checkpoints/step_00000005").exists()  # still held: training did not wait for it
    go.touch()
    _wait_for(lambda: (paused / "checkpoints/step_00000005").exists(), proc, "the step-5 checkpoint")
    assert proc.wait(timeout=120) == 0
    in_place = tmp_path / "in-place"
    keizoku("train", config(setup, in_place, **COMMON), "eval.at_start=false", "checkpoint.background=false")
    for run in (whole, paused):
        assert saved_steps(run) == saved_steps(in_place) == [5, 10, 15, 20]
        for step in saved_steps(run):
            assert_same_checkpoint(run, in_place, step)


def test_rank_0_commits_only_after_every_rank_has_written(setup, tmp_path):
    """Two processes; rank 1's write of step 2 pauses 8 s mid-way: rank 0's own shards are on disk long before,
    yet step 2 appears only once rank 1 has written; the run then finishes with both checkpoints complete."""
    run = tmp_path / "run"
    cfg = config(setup, run, train__max_steps=4, checkpoint__interval=2, eval__interval=0)
    env = hooked("2:writing:sleep=8:1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "-m", "keizoku", "train", str(cfg), "eval.at_start=false"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    staged = run / "checkpoints/.tmp.step_00000002"
    _wait_for(lambda: (staged / "__0_0.distcp").exists(), proc, "rank 0's shards of step 2", timeout=300)
    time.sleep(3)
    assert not (run / "checkpoints/step_00000002").exists() and not (staged / ".metadata").exists()
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out
    assert saved_steps(run) == [2, 4]
    assert "the save of step 4 waited" in out  # for step 2's, which rank 1 was still writing: said, not hidden
    assert sorted(p.name for p in (run / "checkpoints/step_00000002").glob("*.distcp")) == ["__0_0.distcp",
                                                                                          "__1_0.distcp"]


def _start_with(cfg: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "keizoku", "train", str(cfg), "eval.at_start=false"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def assert_same_checkpoint(run: Path, expected: Path, step: int) -> None:
    """Model and optimizer state and the trainer state of ``step``: equal, exactly. (Not the RNG files: the CPU
    generator's state differs from one run to the next before any save — nothing in these runs draws from it.)"""
    a, b = (r / f"checkpoints/step_{step:08d}" for r in (expected, run))
    assert json.loads((b / "trainer_state.json").read_text()) == json.loads((a / "trainer_state.json").read_text())
    sa, sb = dcp_state(a), dcp_state(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        if isinstance(sa[k], torch.Tensor):
            torch.testing.assert_close(sb[k], sa[k], rtol=0, atol=0, msg=f"step {step}: {k}")
        else:
            assert sb[k] == sa[k], (step, k)


def dcp_state(path: Path) -> dict:
    """A DCP checkpoint's whole state (model and optimizer), flattened to {dotted key: value}."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = path.parent.parent / f"state-{path.name}.pt"
    dcp_to_torch_save(path, out)
    flat = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(f"{prefix}.{i}", v)
        else:
            flat[prefix] = value

    walk("", torch.load(out, weights_only=False))
    return flat


@pytest.mark.parametrize("kept", [True, False])
def test_host_copies_outlive_a_stager_that_closes_after_each_save(tmp_path, monkeypatch, kept):
    """torch 2.11's DefaultStager closes its StateDictStager after every save (pytorch/pytorch#183413; on an H200
    the second save of a run failed with KeyError: <class 'type'>). With that behaviour put into this torch, saves
    go on working, each the model at its step, because keizoku keeps the stager's host copies itself — and fail
    without that (kept=False), which shows the test reproduces the fault."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.staging import DefaultStager

    from keizoku.engines.torch import TrainingError, checkpoint

    stage = DefaultStager._stage

    def stage_then_close(self, state_dict, **kwargs):
        staged = stage(self, state_dict, **kwargs)
        self._state_dict_stager.close()  # what torch 2.11 does
        return staged

    monkeypatch.setattr(DefaultStager, "_stage", stage_then_close)
    if not kept:
        monkeypatch.setattr(checkpoint, "_keep_host_copies", lambda stager: None)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
        saver = checkpoint.Checkpointer(tmp_path / "run", keep_last=3)
        expected = {}
        try:
            for step in (1, 2, 3):
                model(torch.randn(4, 8)).sum().backward()
                optimizer.step()
                expected[step] = {k: v.clone() for k, v in model.state_dict().items()}
                if not kept and step == 2:  # here staging runs in the training thread: the fault is raised at once
                    with pytest.raises((KeyError, TrainingError), match="<class 'type'>"):
                        saver.save(step, model, optimizer, {"step": step})
                    return
                saver.save(step, model, optimizer, {"step": step})
            saver.wait()
        finally:
            saver.close()
        assert saved_steps(tmp_path / "run") == [1, 2, 3]
        for step, weights in expected.items():
            restored = {k: torch.zeros_like(v) for k, v in weights.items()}
            import torch.distributed.checkpoint as dcp
            dcp.load({"model": restored}, checkpoint_id=str(tmp_path / f"run/checkpoints/step_{step:08d}"))
            assert all(torch.equal(restored[k], weights[k]) for k in weights), step
    finally:
        dist.destroy_process_group()
