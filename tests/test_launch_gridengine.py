"""keizoku submit/launch on a real Grid Engine (.ci/start-gridengine.sh: Son of Grid Engine on this host).

One host only (two execds cannot share one), so two "nodes" are two node agents on it: KEIZOKU_HOSTS names
the host twice; node 0 starts here, node 1 through `qrsh -inherit` (tight integration), as on a real
multi-host allocation. Skipped without qsub, failed instead under KEIZOKU_REQUIRE_SCHEDULERS=1."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from launch_support import (  # noqa: F401
    SGE_ENV,
    cli,
    job_records,
    logs,
    need,
    same_dataset,
    sharded_tokenize,
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

def test_tokenize_array_job_and_merge_equal_one_run(tmp_path, ja_texts, en_texts):
    """keizoku submit tokenize --tasks 3: an array job (-t 1-3), each task tokenizing its share (the large plain
    file in all three, by byte ranges), and the merge held until every task has ended (-hold_jid): the datasets
    one run over the inputs writes, byte for byte; each task has its log."""
    need("qsub", "qstat", why="Grid Engine")
    out = tmp_path / "out"
    ids, inputs, reference = sharded_tokenize(
        tmp_path, ja_texts, en_texts, {"scheduler": "gridengine", "walltime": "00:05:00", "directives": ["-pe smp 1"]},
        3, ["-o", out], {"output_dir": tmp_path / "one"})
    array, merge = ids
    parts = out / "parts"
    script = next((parts / "submit").glob("*.tokenize.sh")).read_text()
    assert "#$ -t 1-3\n" in script and script.rstrip().endswith('--shard "${SGE_TASK_ID}/3"')
    wait_until(lambda: not ({array, merge} & _qstat_ids()), 180, "the tasks and the merge",
               on_timeout=lambda: "\n".join(p.read_text() for p in sorted((parts / "logs").glob("*"))))
    task_logs = [parts / "logs" / f"keizoku-tokenize-out.o{array}.{k}" for k in (1, 2, 3)]
    assert all(f"share {k} of 3: " in log.read_text() for k, log in enumerate(task_logs, 1))
    merge_log = (parts / "logs" / f"keizoku-merge-out.o{merge}").read_text()
    assert "Traceback" not in merge_log and "merged" in merge_log, merge_log
    assert [Path(p).name for p in reference] == ["a_text_document", "big_text_document", "c_text_document",
                                                 "empty_text_document"]
    for prefix in reference:
        assert same_dataset(prefix, str(out / Path(prefix).name)), prefix
    jobs = [json.loads(line) for line in (parts / "jobs.jsonl").read_text().splitlines()]
    assert [(j["job_id"], j["kind"]) for j in jobs] == [(array, "tokenize"), (merge, "merge")]
    assert jobs[0]["task_logs"] == [str(p) for p in task_logs] and jobs[1]["depends_on"] == array
    status = cli("status", parts)  # the shares, each with its task's log
    assert status.returncode == 0 and "3 of 3 shares complete" in status.stderr, status.stdout + status.stderr
    assert all(str(log) in status.stdout for log in task_logs)



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
    # the test shortens the run between links (below): a change to a run that has trained, made explicit
    proc = cli("submit", cfg, "--profile", prof, "--chain", "3", "--allow-changes", cwd=tmp_path)
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


def _ge_profile(tmp_path: Path, **extra) -> Path:
    host = sge_host()
    prof = tmp_path / "ge-ci.yaml"
    prof.write_text(yaml.safe_dump({
        "scheduler": "gridengine", "walltime": "0-00:05:00", "directives": ["-pe smp 2"], "procs_per_node": 1,
        "launcher": "node", "starter": "qrsh", "env": {"KEIZOKU_HOSTS": f"{host},{host}"}, "stop_margin_s": 0,
        "failure_grace_s": 5, **extra}))
    return prof


def _status_lines(run: Path) -> dict[str, str]:
    proc = cli("status", run)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    return {line.split()[1]: line for line in proc.stdout.splitlines() if line.startswith("job ")}


def test_status_names_a_lost_driver_and_a_deleted_link(tiny, tmp_path):
    """A job whose driver is killed with -9 is lost once it has left Grid Engine's queue; a held link deleted
    with qdel, of which qacct keeps no record, is cancelled. The walltime, given in days, reaches qsub as h_rt
    HH:MM:SS."""
    need("qsub", "qrsh", "qstat", "qdel", "qacct", why="Grid Engine")
    run = tmp_path / "run"
    cfg = write_config(tiny, run, max_steps=100000)
    proc = cli("submit", cfg, "--profile", _ge_profile(tmp_path), "--chain", "2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    first, second = proc.stdout.split()
    assert "#$ -l h_rt=00:05:00\n" in next((run / "submit").glob("*.sh")).read_text()
    subprocess.run(["qdel", second], check=True, capture_output=True)
    driver_pid = wait_until(lambda: job_records(run).get(first, {}).get("driver_pid"), 60, "job 1's driver",
                            on_timeout=lambda: logs(run))
    subprocess.run(["kill", "-9", str(driver_pid)], check=True)
    wait_until(lambda: not ({first, second} & _qstat_ids()), 60, "the jobs to leave the queue")
    lines = _status_lines(run)
    assert lines[first].startswith(f"job {first} lost: gone from the gridengine queue: the launch driver on "
                                   f"{socket.gethostname()} recorded no end"), lines[first]
    assert lines[first].endswith(f"; see {run}/logs/keizoku-run.o{first}; submit again: the run starts from the "
                                 f"beginning (no checkpoint yet)") or "resumes from step" in lines[first]
    assert lines[second] == (f"job {second} cancelled: left the queue without starting, and gridengine keeps no "
                             f"record of it (deleted with qdel?); submit again if that was not meant: the run " +
                             lines[second].split(" the run ")[1])


QMASTER_PID = Path("/var/spool/gridengine/qmaster/qmaster.pid")


def _qmaster(up: bool) -> None:
    """Stop or start Grid Engine's qmaster (as .ci/start-gridengine.sh does), and wait until it is so."""
    if up:
        if subprocess.run(["qstat"], capture_output=True).returncode != 0:
            subprocess.run(["/usr/sbin/sge_qmaster"], check=True)
        wait_until(lambda: subprocess.run(["qstat"], capture_output=True).returncode == 0, 60, "the qmaster")
        return
    pid = int(QMASTER_PID.read_text().strip())
    os.kill(pid, 15)
    wait_until(lambda: not Path(f"/proc/{pid}").exists(), 60, "the qmaster to stop")


def test_qsub_is_tried_again_while_the_qmaster_is_down(tmp_path):
    """With the qmaster down, qsub cannot reach it: keizoku submit tries again after each submit_retry_s wait,
    then says so in one line (exit 1) and removes the script it wrote; when the qmaster is back before the
    last try, the job is queued."""
    need("qsub", "qstat", "qdel", why="Grid Engine")
    if os.geteuid() != 0 or not QMASTER_PID.exists():
        pytest.skip("stopping the qmaster needs root and .ci/start-gridengine.sh's qmaster")
    run = tmp_path / "run"
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"run_dir: {run}\nmodel: {{hf_path: m}}\ndata: {{mock: true}}\ntrain: {{max_steps: 5}}\n")
    prof = _ge_profile(tmp_path, submit_args=["-h"])  # held: queued, never run
    _qmaster(up=False)
    try:
        proc = cli("submit", cfg, "--profile", prof, "--set", "submit_retry_s=[0.2]", cwd=tmp_path)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        tried, error = proc.stderr.strip().splitlines()
        assert tried.startswith("qsub could not reach gridengine (try 1 of 2): error: commlib error: ")
        assert tried.endswith("; trying again in 0.2 s")
        assert error.startswith("error: qsub could not reach gridengine in 2 tries over 0.2 s (exit 1): error: "
                                "commlib error: ") and "unable to send message to qmaster" in error
        assert error.endswith(".sh and its plan are removed); submit again once gridengine answers")
        assert not list((run / "submit").iterdir()) and not (run / "jobs.jsonl").exists()
        # keizoku status meanwhile: a job submitted earlier cannot be placed, and it says why
        (run / "jobs.jsonl").write_text('{"job_id": "424242", "scheduler": "gridengine", "link": 1, "of": 1}\n')
        status = cli("status", run)
        assert status.returncode == 0 and "Traceback" not in status.stderr, status.stderr
        job = json.loads(cli("status", run, "--json").stdout)["jobs"][0]
        assert job["state"] == "submitted" and job["detail"].startswith("gridengine could not be asked (qstat failed "
                                                                        "(1): error: commlib error: ")
        assert f"{job['detail']}: the states are the launch driver's records; try again once it answers" in \
            status.stdout.replace("\n", " ")
        (run / "jobs.jsonl").unlink()

        err = tmp_path / "submit.err"
        with open(err, "w") as f:
            late = subprocess.Popen([sys.executable, "-m", "keizoku", "submit", str(cfg), "--profile", str(prof),
                                     "--set", "submit_retry_s=[3,10]"], stdout=subprocess.PIPE, stderr=f, text=True,
                                    cwd=tmp_path)
        wait_until(lambda: "trying again in 3 s" in err.read_text(), 60, "the first try to fail")
        _qmaster(up=True)
        out, _ = late.communicate(timeout=60)
    finally:
        _qmaster(up=True)
    assert late.returncode == 0, err.read_text()
    job_id = out.split()[0]
    subprocess.run(["qdel", job_id], capture_output=True)
    assert [j["job_id"] for j in map(json.loads, (run / "jobs.jsonl").read_text().splitlines())] == [job_id]
    assert len(list((run / "submit").glob("*.sh"))) == 1

