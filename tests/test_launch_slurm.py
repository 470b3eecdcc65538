"""keizoku submit/launch on a real Slurm (.ci/start-slurm.sh: slurmctld + two slurmd on this host, node1 and
node2). Skipped without sbatch, failed instead under KEIZOKU_REQUIRE_SCHEDULERS=1 (what .ci/run sets)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import yaml
from launch_support import (  # noqa: F401
    cli,
    job_records,
    logs,
    need,
    tiny,
    train_records,
    wait_until,
    world_size,
    write_config,
)

from keizoku.launch import agent, ranks, schedulers
from keizoku.launch.schedulers import Slurm


def read_env(path: Path) -> dict:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


def test_ranks_from_a_real_two_node_job(tmp_path):
    need("sbatch", "srun", "scontrol", why="Slurm")
    job = tmp_path / "env.sh"
    job.write_text(f"#!/bin/bash\nenv > {tmp_path}/batch.env\n"
                   f"srun --ntasks-per-node=2 bash -c 'env > {tmp_path}/task.$SLURM_PROCID.env'\n")
    subprocess.run(["sbatch", "--wait", "-N", "2", "--ntasks-per-node=2", "-t", "2", "-o", str(tmp_path / "out"),
                    str(job)], check=True, capture_output=True, timeout=120)
    batch = read_env(tmp_path / "batch.env")
    alloc = schedulers.detect_allocation(batch)
    expected = subprocess.run(["scontrol", "show", "hostnames", batch["SLURM_JOB_NODELIST"]], capture_output=True,
                              text=True).stdout.split()
    assert alloc.scheduler == "slurm" and sorted(alloc.hosts) == sorted(expected) and len(expected) == 2
    assert alloc.hosts[0] == batch["SLURMD_NODENAME"] and ranks.from_env(batch) is None
    seen = []
    for i in range(4):
        env = read_env(tmp_path / f"task.{i}.env")
        r = ranks.from_env(env)
        node = agent.node_rank_of(alloc.hosts, env)  # what a node agent started by srun computes
        seen.append((r.rank, r.local_rank, node, env["SLURMD_NODENAME"]))
        assert (r.world_size, r.local_world_size) == (4, 2)
    assert sorted(s[0] for s in seen) == [0, 1, 2, 3]
    assert sorted((s[2], s[1]) for s in seen) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert {s[3] for s in seen if s[2] == 0} == {alloc.hosts[0]}


def _squeue(ids: list[str]) -> str:
    return subprocess.run(["squeue", "-h", "-j", ",".join(ids), "-o", "%i %T %r"], capture_output=True,
                          text=True).stdout


def test_two_nodes_chain_signal_checkpoint_resume(tiny, tmp_path):
    """Three chained jobs on two nodes: the first is warned (SIGUSR1 to the batch shell, delivered by Slurm
    as --signal=B:USR1 would), saves and exits 3; the second resumes and completes; the third exits at once."""
    need("sbatch", "squeue", "scancel", why="Slurm")
    prof = tmp_path / "slurm-ci.yaml"
    prof.write_text(yaml.safe_dump({"base": "slurm", "gpus_per_node": 0, "procs_per_node": 1, "directives": [],
                                    "walltime": "00:05:00", "warning_signal_s": 60, "failure_grace_s": 10}))
    run = tmp_path / "run"
    cfg = write_config(tiny, run, max_steps=40)
    proc = cli("submit", cfg, "--profile", prof, "--nodes", "2", "--chain", "3")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ids = proc.stdout.split()
    assert len(ids) == 3
    script = next((run / "submit").glob("*.sh")).read_text()
    assert "#SBATCH --nodes=2" in script and "#SBATCH --signal=B:USR1@60" in script
    assert _squeue(ids[1:]).count("PENDING Dependency") == 2

    wait_until(lambda: len(train_records(run)) >= 2, 180, "job 1 to train two steps", on_timeout=lambda: logs(run))
    subprocess.run(["scancel", "--batch", "--signal=USR1", ids[0]], check=True)
    wait_until(lambda: not _squeue(ids).strip(), 240, "the chain to finish",
               on_timeout=lambda: _squeue(ids) + logs(run))

    jobs = job_records(run)
    first, second, third = (jobs[i] for i in ids)
    assert first["hosts"] == ["node1", "node2"] and first["world_size"] == 2
    assert (first["exit_status"], first["stop_reason"]) == (3, f"{Slurm.warning_signal} received"), logs(run)
    assert second["exit_status"] == 0 and third["exit_status"] == 0, logs(run)
    out = {i: (run / f"logs/slurm-{i}.out").read_text() for i in ids}
    saved = int(out[ids[0]].split("saved step ")[1].split(";")[0])
    assert 2 <= saved < 40
    assert f"resumed from {run}/checkpoints/step_{saved:08d}" in out[ids[1]]
    assert "training is complete (step 40 of 40); nothing to run" in out[ids[2]]
    assert third["ended"] - third["started"] < 5
    records = train_records(run)
    assert records[-1]["step"] == 40 and world_size(records[-1]) == 2
    status = json.loads(cli("status", run, "--json").stdout)
    assert [j["state"] for j in status["jobs"]] == ["stopped after saving", "completed", "completed"]
    assert status["checkpoint_step"] == 40


def test_a_rank_killed_on_node2_ends_the_two_node_job(tiny, tmp_path):
    """A rank killed on node2 ends the whole two-node job with its status, in bounded time."""
    need("sbatch", "squeue", why="Slurm")
    prof = tmp_path / "slurm-ci.yaml"
    prof.write_text(yaml.safe_dump({"base": "slurm", "gpus_per_node": 0, "procs_per_node": 1, "directives": [],
                                    "walltime": "00:05:00", "warning_signal_s": 60, "failure_grace_s": 5}))
    run = tmp_path / "run"
    cfg = write_config(tiny, run, max_steps=100000)
    proc = cli("submit", cfg, "--profile", prof, "--nodes", "2")
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.split()[0]
    wait_until(lambda: len(train_records(run)) >= 2, 180, "two steps", on_timeout=lambda: logs(run))
    # rank 1 runs under node2's agent; kill it the way an OOM killer would
    pid = _rank_pid(cfg, 1)
    subprocess.run(["kill", "-9", str(pid)], check=True)
    t0 = time.monotonic()
    wait_until(lambda: not _squeue([job_id]).strip(), 120, "the job to end", on_timeout=lambda: logs(run))
    assert time.monotonic() - t0 < 90
    rec = job_records(run)[job_id]
    assert rec["state"] == "failed" and rec["exit_status"] not in (0, 3), logs(run)
    assert "rank 1" in logs(run) and "killed by SIGKILL" in logs(run)


def _rank_pid(cfg: Path, rank: int) -> int:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes()
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(cfg).encode() in cmd and b"train" in cmd and f"RANK={rank}".encode() in env:
            return int(entry.name)
    raise AssertionError(f"no training process of rank {rank} found")
