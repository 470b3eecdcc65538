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
    same_dataset,
    sharded_tokenize,
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


def _submit_two_node_chain(tiny, tmp_path: Path, run: Path, *, max_steps: int, walltime: str,
                           failure_grace_s: int) -> tuple[Path, list[str]]:
    """A chain of three two-node jobs on the local Slurm: (the config, the job ids)."""
    prof = tmp_path / "slurm-ci.yaml"
    prof.write_text(yaml.safe_dump({"base": "slurm", "gpus_per_node": 0, "procs_per_node": 1, "directives": [],
                                    "walltime": walltime, "warning_signal_s": 60, "failure_grace_s": failure_grace_s}))
    cfg = write_config(tiny, run, max_steps=max_steps)
    proc = cli("submit", cfg, "--profile", prof, "--nodes", "2", "--chain", "3")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return cfg, proc.stdout.split()


def test_two_nodes_chain_signal_checkpoint_resume(tiny, tmp_path):
    """Three chained jobs on two nodes: the first is warned (SIGUSR1 to the batch shell, delivered by Slurm
    as --signal=B:USR1 would), saves and exits 3; the second resumes and completes; the third exits at once."""
    need("sbatch", "squeue", "scancel", why="Slurm")
    run = tmp_path / "run"
    cfg, ids = _submit_two_node_chain(tiny, tmp_path, run, max_steps=40, walltime="00:05:00", failure_grace_s=10)
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
    assert rec["detail"] == "rank 1 on node2 killed by SIGKILL", logs(run)  # the rank, its node, the signal
    status = cli("status", run)
    line = next(line for line in status.stdout.splitlines() if line.startswith(f"job {job_id} "))
    assert line.startswith(f"job {job_id} failed: rank 1 on node2 killed by SIGKILL; see {run}/logs/slurm-{job_id}.out; "
                           f"fix the cause and submit again: the run "), status.stdout


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


def _slurm_state(job_id: str) -> str:
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True).stdout
    return out.split("JobState=")[1].split()[0] if "JobState=" in out else ""


def _status_lines(run: Path) -> dict[str, str]:
    proc = cli("status", run)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    return {line.split()[1]: line for line in proc.stdout.splitlines() if line.startswith("job ")}


def test_status_names_lost_and_cancelled_jobs(tiny, tmp_path):
    """keizoku status on what a real Slurm did: a link whose driver was killed with -9 is lost (sacct or scontrol:
    FAILED, ExitCode 0:9), a running link cancelled with scancel and a waiting one cancelled before it started are
    cancelled; each says what to do."""
    need("sbatch", "squeue", "scancel", "scontrol", why="Slurm")
    run = tmp_path / "run"
    cfg, (first, second, third) = _submit_two_node_chain(tiny, tmp_path, run, max_steps=100000,
                                                         walltime="0-00:05:00", failure_grace_s=5)
    subprocess.run(["scancel", third], check=True)  # waiting for the second
    driver_pid = wait_until(lambda: job_records(run).get(first, {}).get("driver_pid"), 60, "job 1's driver",
                            on_timeout=lambda: logs(run))
    subprocess.run(["kill", "-9", str(driver_pid)], check=True)
    wait_until(lambda: job_records(run).get(second, {}).get("driver_pid"), 60, "job 2's driver",
               on_timeout=lambda: logs(run))
    subprocess.run(["scancel", second], check=True)
    wait_until(lambda: not _squeue([first, second, third]).strip(), 60, "the jobs to leave the queue")
    assert _slurm_state(first) == "FAILED" and _slurm_state(second) == "CANCELLED"

    lines = _status_lines(run)
    assert lines[first] == (f"job {first} lost: gone from the slurm queue: the launch driver on node1 recorded no end; "
                            f"killed by SIGKILL (slurm: FAILED, ExitCode 0:9, JobLaunchFailure); see "
                            f"{run}/logs/slurm-{first}.out; submit again: the run " + lines[first].split(" the run ")[1])
    assert lines[second].startswith(f"job {second} cancelled: ")
    assert "slurm: CANCELLED" in lines[second] and lines[second].endswith("submit again if that was not meant: the "
                                                                          "run " + lines[second].split(" the run ")[1])
    assert lines[third] == (f"job {third} cancelled: cancelled before it started (slurm: CANCELLED, ExitCode 0:0, "
                            f"Dependency); submit again if that was not meant: the run " +
                            lines[third].split(" the run ")[1])
    states = {j["job_id"]: j["state"] for j in json.loads(cli("status", run, "--json").stdout)["jobs"]}
    assert states == {first: "lost", second: "cancelled", third: "cancelled"}


def test_a_refused_submission_leaves_nothing_that_looks_live(tmp_path):
    """sbatch refuses the job (a partition that does not exist): no retry, one line with sbatch's words and what
    to do, exit 1; the job script and plan it would have run are removed; what was there before is untouched."""
    need("sbatch", why="Slurm")
    run = tmp_path / "run"
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"run_dir: {run}\nmodel: {{hf_path: m}}\ndata: {{mock: true}}\ntrain: {{max_steps: 5}}\n")
    before = {"jobs.jsonl": '{"job_id": "1", "scheduler": "slurm"}\n', "submit/20250101-000000.sh": "#!/bin/bash\n",
              "submit/20250101-000000.plan.json": "{}\n", "notes.txt": "mine\n"}
    for name, text in before.items():
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text(text)
    proc = cli("submit", cfg, "--profile", "slurm", "--set", "queue=no-such-partition", "--set", "gpus_per_node=0",
               "--set", "directives=[]", "--chain", "2")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "could not reach" not in lines[0], proc.stderr
    assert lines[0].startswith("error: sbatch refused the job (exit 1): sbatch: error: invalid partition specified: "
                               "no-such-partition; sbatch: error: Batch job submission failed: Invalid partition name "
                               "specified; nothing was queued (")
    assert lines[0].endswith(".sh and its plan are removed); fix what it names (the profile's queue, group, "
                             "directives or submit_args; keizoku submit --dry-run shows the script) and submit again")
    assert {str(p.relative_to(run)) for p in run.rglob("*") if p.is_file()} == set(before)
    assert all((run / name).read_text() == text for name, text in before.items())


def test_tokenize_array_job_and_merge_equal_one_run(tmp_path, ja_texts, en_texts):
    """keizoku submit tokenize --tasks 2 --output-prefix: an array job (--array=1-2) on the two nodes, and the
    merge (--dependency=afterok): the dataset one run over the inputs writes, byte for byte."""
    need("sbatch", "squeue", why="Slurm")
    ids, inputs, reference = sharded_tokenize(
        tmp_path, ja_texts, en_texts, {"base": "slurm", "gpus_per_node": 0, "directives": [], "walltime": "00:05:00"},
        2, ["--output-prefix", tmp_path / "out/all"], {"output_prefix": str(tmp_path / "one/all")})
    array, merge = ids
    parts = tmp_path / "out/all.parts"
    script = next((parts / "submit").glob("*.tokenize.sh")).read_text()
    assert "#SBATCH --array=1-2\n" in script and "--signal" not in script
    assert script.rstrip().endswith('--shard "${SLURM_ARRAY_TASK_ID}/2"')
    wait_until(lambda: not _squeue([array, merge]).strip(), 180, "the tasks and the merge",
               on_timeout=lambda: _squeue([array, merge]) + "\n".join(p.read_text()
                                                                  for p in (parts / "logs").glob("*")))
    for k in (1, 2):
        assert f"share {k} of 2: " in (parts / "logs" / f"slurm-{array}_{k}.out").read_text()
    assert "merged" in (parts / "logs" / f"slurm-{merge}.out").read_text()
    assert same_dataset(reference[0], str(tmp_path / "out/all_text_document"))
