"""keizoku submit/launch on a real Grid Engine (.ci/start-gridengine.sh: Son of Grid Engine on this host).

One host only (two execds cannot share one), so two "nodes" are two node agents on it: KEIZOKU_HOSTS names
the host twice; node 0 starts here, node 1 through `qrsh -inherit` (tight integration), as on a real
multi-host allocation. Skipped without qsub, failed instead under KEIZOKU_REQUIRE_SCHEDULERS=1."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest
import yaml
from launch_support import (  # noqa: F401
    SGE_ENV,
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

from keizoku.launch import schedulers
from keizoku.launch.schedulers import GridEngine


@pytest.fixture(autouse=True)
def _sge_env(monkeypatch):
    for k, v in SGE_ENV.items():
        monkeypatch.setenv(k, os.environ.get(k, v))


def sge_host() -> str:
    return subprocess.run(["/usr/lib/gridengine/gethostname", "-name"], capture_output=True, text=True).stdout.strip() \
        or socket.gethostname()


def test_allocation_from_a_real_job(tmp_path):
    need("qsub", "qrsh", why="Grid Engine")
    job = tmp_path / "env.sh"
    job.write_text(f"#!/bin/bash\nenv > {tmp_path}/job.env\ncp \"$PE_HOSTFILE\" {tmp_path}/pe_hostfile\n"
                   f"qrsh -inherit $(hostname) \"env > {tmp_path}/task.env\"\n")
    subprocess.run(["qsub", "-sync", "y", "-pe", "smp", "2", "-o", str(tmp_path / "out"), "-j", "y", str(job)],
                   check=True, capture_output=True, timeout=120, cwd=tmp_path)
    env = dict(line.split("=", 1) for line in (tmp_path / "job.env").read_text().splitlines() if "=" in line)
    assert env["NHOSTS"] == "1" and env["NSLOTS"] == "2" and env["PE"] == "smp"
    env["PE_HOSTFILE"] = str(tmp_path / "pe_hostfile")  # the original is gone with the job
    alloc = schedulers.detect_allocation(env)
    assert alloc.scheduler == "gridengine" and alloc.job_id == env["JOB_ID"]
    assert [schedulers.short(h) for h in alloc.hosts] == [schedulers.short(sge_host())] and alloc.slots == [2]
    host = alloc.hosts[0]
    assert schedulers.detect_allocation({**env, "KEIZOKU_HOSTS": f"{host},{host}"}).hosts == [host, host]
    task = (tmp_path / "task.env").read_text()
    assert f"JOB_ID={env['JOB_ID']}\n" in task  # a qrsh -inherit task belongs to the job


def _qstat_ids() -> set[str]:
    out = subprocess.run(["qstat", "-u", "*"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines()[2:] if line.split()}


def test_notify_at_h_rt_checkpoints_and_the_chain_resumes(tiny, tmp_path):
    """`-notify -l h_rt=0:0:35`: Grid Engine sends SIGUSR2 at the limit; both nodes save, the job exits 3;
    the chained second job (-hold_jid) resumes and completes; the third exits at once."""
    need("qsub", "qrsh", "qstat", why="Grid Engine")
    host = sge_host()
    prof = tmp_path / "ge-ci.yaml"
    prof.write_text(yaml.safe_dump({
        "scheduler": "gridengine", "walltime": "00:00:35", "directives": ["-pe smp 2"], "procs_per_node": 1,
        "launcher": "node", "starter": "qrsh", "env": {"KEIZOKU_HOSTS": f"{host},{host}"},
        "stop_margin_s": 0, "failure_grace_s": 10}))
    run = tmp_path / "run"
    cfg = write_config(tiny, run, max_steps=100000)
    proc = cli("submit", cfg, "--profile", prof, "--chain", "3", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ids = proc.stdout.split()
    assert len(ids) == 3
    script = next((run / "submit").glob("*.sh")).read_text()
    assert "#$ -notify" in script and "#$ -l h_rt=00:00:35" in script

    stop_file = run / "launch" / f"stop.{ids[0]}"
    wait_until(stop_file.exists, 150, "Grid Engine's h_rt warning (the driver's stop file)",
               interval=0.05, on_timeout=lambda: logs(run))
    first_log = run / "logs" / f"keizoku-run.o{ids[0]}"
    saved = int(wait_until(lambda: "saved step " in first_log.read_text() and first_log.read_text(), 20,
                           "the first job's checkpoint", interval=0.05).split("saved step ")[1].split(";")[0])
    # the second job starts seconds after the first ends and reads the config then: give it a short rest
    total = saved + 3
    cfg.write_text(cfg.read_text().replace("max_steps: 100000", f"max_steps: {total}"))
    wait_until(lambda: not (set(ids) & _qstat_ids()), 180, "the chain to finish", on_timeout=lambda: logs(run))

    jobs = job_records(run)
    first, second, third = (jobs[i] for i in ids)
    text = logs(run)
    assert (first["exit_status"], first["stop_reason"]) == (3, f"{GridEngine.warning_signal} received"), text
    assert first["world_size"] == 2 and first["starter"] == "qrsh"
    assert 30 <= first["ended"] - first["started"] <= 45  # h_rt, not the kill 5 s later
    assert f"resumed from {run}/checkpoints/step_{saved:08d}" in text
    assert second["exit_status"] == 0 and third["exit_status"] == 0, text
    assert f"training is complete (step {total} of {total}); nothing to run" in text
    assert third["ended"] - third["started"] < 5
    records = train_records(run)
    assert records[-1]["step"] == total and world_size(records[-1]) == 2
    status = json.loads(cli("status", run, "--json").stdout)
    assert [j["state"] for j in status["jobs"]] == ["stopped after saving", "completed", "completed"]
    assert Path(status["checkpoint"]).name == f"step_{total:08d}"
