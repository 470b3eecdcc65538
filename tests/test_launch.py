"""keizoku launch / submit / status without a scheduler: allocation and rank parsing from variables captured in
real jobs (tests/launch_data), port locking, profiles, golden job scripts, and real launches over loopback."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from launch_support import (  # noqa: F401
    DATA,
    REQUIRE,
    cli,
    job_records,
    need,
    tiny,
    train_records,
    wait_until,
    world_size,
    write_config,
)

from keizoku.launch import driver, port, profile, ranks, schedulers, submit
from keizoku.launch.schedulers import AllocationError, scheduler_named
from keizoku.launch.submit import prepare_submission

GOLDEN = DATA / "golden"


def read_env(name: str, **extra) -> dict:
    env = {}
    for line in (DATA / name).read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key] = value
    env.update(extra)
    return env


# --- allocations -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, hosts", [
    ("node[1-2]", ["node1", "node2"]),
    ("gpu[01-03,07],login1", ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]),
    ("a[1-2]b[3-4]", ["a1b3", "a1b4", "a2b3", "a2b4"]),
    ("r1n[008-010]", ["r1n008", "r1n009", "r1n010"]),
    ("single", ["single"]),
])
def test_slurm_nodelist_expands_like_scontrol(spec, hosts):
    assert schedulers.expand_nodelist(spec) == hosts
    if shutil.which("scontrol"):  # the real thing agrees
        out = subprocess.run(["scontrol", "show", "hostnames", spec], capture_output=True, text=True).stdout
        assert out.split() == hosts


def test_slurm_nodelist_errors_name_the_variable():
    with pytest.raises(AllocationError, match=r"SLURM_JOB_NODELIST: unbalanced"):
        schedulers.expand_nodelist("gpu[1-2")
    with pytest.raises(AllocationError, match=r"bad range 'x'"):
        schedulers.expand_nodelist("gpu[x]")


def test_grid_engine_allocation_from_a_real_job(tmp_path):
    hostfile = tmp_path / "pe_hostfile"
    shutil.copy(DATA / "gridengine.pe_hostfile", hostfile)  # "vm 2 all.q@vm UNDEFINED", from a real job
    alloc = schedulers.detect_allocation(read_env("gridengine.env", PE_HOSTFILE=str(hostfile)), hostname="vm")
    assert (alloc.scheduler, alloc.job_id, alloc.hosts, alloc.slots) == ("gridengine", "2", ["vm"], [2])
    # TSUBAME-style: several hosts, one queue line each, a host listed for two queues; the batch host goes first
    hostfile.write_text("r1n1 4 node_f.q@r1n1 UNDEFINED\nr2n5 4 node_f.q@r2n5 UNDEFINED\n"
                        "r2n5 2 other.q@r2n5 UNDEFINED\nr3n2 4 node_f.q@r3n2 UNDEFINED\n")
    alloc = schedulers.detect_allocation({"JOB_ID": "77", "PE_HOSTFILE": str(hostfile)},
                                         hostname="r2n5.t4.gsic.titech.ac.jp")
    assert alloc.hosts == ["r2n5", "r1n1", "r3n2"] and alloc.slots == [6, 4, 4]
    hostfile.write_text("r1n1 four node_f.q@r1n1 UNDEFINED\n")
    with pytest.raises(AllocationError, match=rf"{hostfile}:1: expected 'host slots queue processors'"):
        schedulers.detect_allocation({"JOB_ID": "77", "PE_HOSTFILE": str(hostfile)})
    with pytest.raises(AllocationError, match="PE_HOSTFILE=/nonexistent: cannot read"):
        schedulers.detect_allocation({"JOB_ID": "77", "PE_HOSTFILE": "/nonexistent"})
    # a job without a parallel environment: this host, NSLOTS slots
    alloc = schedulers.detect_allocation({"JOB_ID": "78", "SGE_ROOT": "/sge", "NSLOTS": "3"}, hostname="r1n1")
    assert (alloc.scheduler, alloc.hosts, alloc.slots) == ("gridengine", ["r1n1"], [3])


def test_pbs_allocation_from_a_real_format_nodefile():
    env = read_env("pbs.env", PBS_NODEFILE=str(DATA / "pbs.nodefile"))
    alloc = schedulers.detect_allocation(env, hostname="hnode017.abci.local")
    assert alloc.scheduler == "pbs" and alloc.job_id == "412345.pbs1"
    assert alloc.hosts == ["hnode017.abci.local", "hnode001.abci.local"] and alloc.slots == [8, 8]
    assert schedulers.parse_nodefile("a slots=4\nb slots=4\n# comment\n") == [("a", 4), ("b", 4)]


def test_slurm_allocation_from_a_real_batch_shell():
    alloc = schedulers.detect_allocation(read_env("slurm-batch.env"), hostname="vm")
    assert (alloc.scheduler, alloc.job_id, alloc.hosts, alloc.slots, alloc.batch_host) == \
        ("slurm", "2", ["node1", "node2"], [2, 2], "node1")
    alloc = schedulers.detect_allocation(read_env("slurm-batch.env", SLURMD_NODENAME="node2"))
    assert alloc.hosts == ["node2", "node1"]  # rank 0 on the batch host
    assert alloc.first_listed == "node1"  # where srun puts task 0: launcher mpi with srun refuses this job


def test_keizoku_hosts_narrows_and_checks_the_allocation():
    env = read_env("slurm-batch.env", KEIZOKU_HOSTS="node2,node2")
    assert schedulers.detect_allocation(env).hosts == ["node2", "node2"]  # two node launchers on one host
    with pytest.raises(AllocationError, match=r"KEIZOKU_HOSTS: 'node9' is not in this job's allocation"):
        schedulers.detect_allocation(read_env("slurm-batch.env", KEIZOKU_HOSTS="node1 node9"))
    local = schedulers.detect_allocation({"KEIZOKU_HOSTS": "localhost,localhost", "KEIZOKU_LOCAL_JOB_ID": "j1"})
    assert (local.scheduler, local.job_id, local.hosts) == ("local", "j1", ["localhost", "localhost"])


# --- ranks ------------------------------------------------------------------------------------------------------

def test_ranks_from_real_slurm_and_openmpi_tasks():
    seen = set()
    for i in range(4):
        r = ranks.from_env(read_env(f"slurm-step.{i}.env"))
        assert (r.rank, r.world_size, r.local_world_size) == (i, 4, 2) and r.local_rank == i % 2
        seen.add((r.rank, r.local_rank))
    assert len(seen) == 4
    assert ranks.from_env(read_env("slurm-batch.env")) is None  # the batch shell is not a task
    for i in range(3):
        r = ranks.from_env(read_env(f"openmpi.{i}.env"))
        assert (r.source, r.rank, r.world_size, r.local_rank, r.local_world_size) == ("Open MPI", i, 3, i, 3)
    env = ranks.from_env({"PMI_RANK": "5", "PMI_SIZE": "8", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "4"})
    assert env.torch_env("h", 1234) == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                                        "MASTER_ADDR": "h", "MASTER_PORT": "1234"}
    with pytest.raises(ranks.RankError, match="inconsistent"):
        ranks.from_env({"OMPI_COMM_WORLD_RANK": "4", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0"})
    with pytest.raises(ranks.RankError, match="OMPI_COMM_WORLD_SIZE='x': expected an integer"):
        ranks.from_env({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "x"})


def test_worker_derives_rendezvous_for_a_users_own_mpirun(tmp_path):
    from keizoku.launch.worker import torch_env

    hostfile = tmp_path / "pe_hostfile"
    hostfile.write_text("r1n1 4 q@r1n1 UNDEFINED\nr1n2 4 q@r1n2 UNDEFINED\n")
    env = {**read_env("openmpi.1.env"), "JOB_ID": "4242", "PE_HOSTFILE": str(hostfile)}
    got = torch_env(env)
    assert got["RANK"] == "1" and got["MASTER_ADDR"] == "r1n1"
    assert got["MASTER_PORT"] == str(port.first_candidate("4242"))  # every rank computes the same port
    assert torch_env({**env, "MASTER_ADDR": "x", "MASTER_PORT": "999"})["MASTER_PORT"] == "999"


# --- ports ------------------------------------------------------------------------------------------------------

def test_two_jobs_on_one_node_cannot_pick_the_same_port(tmp_path):
    lock_dir = str(tmp_path / "locks")
    p1, fd1 = port.pick_port("123", lock_dir)
    assert p1 == port.first_candidate("123")
    # the same job id (or a colliding one) while the first job runs: the next free port
    p2, fd2 = port.pick_port("123", lock_dir)
    assert p2 != p1
    # a holder in another process blocks it too
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl,os,sys,time; fd=os.open(sys.argv[1], os.O_RDWR);"
                               "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)",
                               f"{lock_dir}/{port.first_candidate('999')}.lock"], stdout=subprocess.PIPE, text=True)
    try:
        open(f"{lock_dir}/{port.first_candidate('999')}.lock", "a").close()
        assert holder.stdout.readline().strip() == "locked"
        p3, fd3 = port.pick_port("999", lock_dir)
        assert p3 != port.first_candidate("999")
    finally:
        holder.kill()
        holder.wait()
    os.close(fd1)
    assert port.pick_port("123", lock_dir)[0] == p1  # freed with its holder
    # a port some other program listens on is skipped
    busy = socket.socket()
    busy.bind(("", port.first_candidate("busy")))
    busy.listen()
    try:
        assert port.pick_port("busy", lock_dir)[0] != port.first_candidate("busy")
    finally:
        busy.close()
    assert 20000 <= p2 < 32000


# --- profiles ---------------------------------------------------------------------------------------------------

def test_shipped_profiles_load_and_explain_what_is_missing():
    for name in ("local", "slurm", "tsubame4", "abci3"):
        assert (profile.SHIPPED / f"{name}.yaml").exists()
    assert profile.load_profile("slurm").starter == "srun"
    with pytest.raises(profile.ProfileError, match=r"profile tsubame4: group: required by this profile; pass "
                                                   r"--set group="):
        profile.load_profile("tsubame4")
    p = profile.load_profile("tsubame4", ["group=tga123", "nodes=4", "env.NCCL_DEBUG=INFO"])
    assert (p.group, p.nodes, p.env["NCCL_DEBUG"], p.scheduler) == ("tga123", 4, "INFO", "gridengine")
    with pytest.raises(profile.ProfileError, match=r"profile 'nope' not found \(known: abci3, local, slurm, tsubame4"):
        profile.load_profile("nope")
    with pytest.raises(profile.ProfileError, match=r"warning_signal_s: 300 s is not less than the walltime"):
        profile.load_profile("slurm", ["walltime=00:05:00"])
    with pytest.raises(profile.ProfileError, match=r"walltime \(--walltime; slurm's --time\): 'soon' is not HH:MM:SS"):
        profile.load_profile("slurm", ["walltime=soon"])


def test_user_profiles_extend_shipped_ones(tmp_path, monkeypatch):
    monkeypatch.setenv("KEIZOKU_PROFILE_PATH", str(tmp_path))
    (tmp_path / "tsubame4.yaml").write_text("base: tsubame4\ngroup: tga999\nsetup: [module load cuda/12.8]\n")
    p = profile.load_profile("tsubame4")  # the user's file of the same name, on top of the shipped one
    assert (p.group, p.setup, p.gpus_per_node) == ("tga999", ["module load cuda/12.8"], 4)
    assert profile.available_profiles()["tsubame4"] == tmp_path / "tsubame4.yaml"
    (tmp_path / "bad.yaml").write_text("base: slurm\nnodez: 3\n")
    with pytest.raises(profile.ProfileError, match=r"bad.yaml: nodez: Key 'nodez' not in 'Profile'"):
        profile.load_profile("bad")
    (tmp_path / "mpi.yaml").write_text("base: slurm\nlauncher: mpi\nstarter: qrsh\n")
    with pytest.raises(profile.ProfileError, match="starter: launcher mpi needs srun or mpirun"):
        profile.load_profile("mpi")


# --- job scripts (golden files) ---------------------------------------------------------------------------------

def golden_script(name: str, sets: list[str], launcher_sets: list[str] = (), container: str | None = None) -> str:
    from keizoku.config import load_config

    cfg_text = "run_dir: runs/llama-ja\nmodel: {hf_path: /models/Llama-3.1-8B}\ndata: {mock: true}\n" \
               "train: {max_steps: 1000, global_batch_size: 64}\n"
    work = Path("/work/proj")
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        cfg_path = Path(d) / "run.yaml"
        cfg_path.write_text(cfg_text)
        cfg = load_config(cfg_path)
    prof = profile.load_profile(name, [*sets, *launcher_sets, "python=/opt/venv/bin/python"])
    plan, _, text = prepare_submission(cfg, Path("configs/run.yaml"), ["optim.lr=1e-5"], prof, workdir=work,
                                       sid="20250101-000000", container=Path(container) if container else None,
                                       command="keizoku submit configs/run.yaml optim.lr=1e-5 ...")
    from keizoku import __version__

    return text.replace(f"keizoku {__version__} submit", "keizoku VERSION submit") + "\n# plan:\n" + plan.to_json()


@pytest.mark.parametrize("case, name, sets, container", [
    ("abci3", "abci3", ["group=gaa50000", "nodes=4", "walltime=12:00:00"], None),
    ("tsubame4", "tsubame4", ["group=tga-ja", "nodes=2"], None),
    ("slurm", "slurm", ["nodes=8", "queue=gpu", "group=proj1"], None),
    ("slurm-mpi-container", "slurm", ["nodes=2", "launcher=mpi"], "images/keizoku.sif"),
])
def test_job_scripts_match_golden_files(case, name, sets, container):
    text = golden_script(name, sets, container=container)
    path = GOLDEN / f"{case}.sh"
    if os.environ.get("KEIZOKU_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert text == path.read_text(), f"{path} differs; KEIZOKU_UPDATE_GOLDEN=1 rewrites it after review"
    subprocess.run(["bash", "-n"], input=text.split("\n# plan:\n")[0], text=True, check=True)  # valid shell


def test_submit_commands_chain_and_job_ids():
    pbs, ge, slurm = (scheduler_named(n) for n in ("pbs", "gridengine", "slurm"))
    p = profile.load_profile("abci3", ["group=gaa50000"])
    s = "/r/job.sh"
    assert pbs.submit_command(p, s) == ["qsub", "/r/job.sh"]
    assert pbs.submit_command(p, s, "412345.pbs1") == ["qsub", "-W", "depend=afterany:412345.pbs1", "/r/job.sh"]
    g = profile.load_profile("tsubame4", ["group=tga1"])
    assert ge.submit_command(g, s, "77") == ["qsub", "-terse", "-g", "tga1", "-hold_jid", "77", "/r/job.sh"]
    assert slurm.submit_command(profile.load_profile("slurm"), s, "9") == \
        ["sbatch", "--parsable", "--dependency=afterany:9", "/r/job.sh"]
    assert scheduler_named("local").submit_command(profile.load_profile("local"), s, None) == ["bash", "/r/job.sh"]
    assert pbs.parse_job_id("412345.pbs1\n") == "412345.pbs1"
    assert ge.parse_job_id("77\n") == "77"
    assert ge.parse_job_id('Your job 78 ("x") has been submitted\n') == "78"
    assert slurm.parse_job_id("9;cluster\n") == "9"
    with pytest.raises(ValueError, match="cannot read a job id"):
        slurm.parse_job_id("sbatch: error: invalid partition\n")
    # which refusals mean the scheduler was not reached (tried again), as the real commands print them here
    assert slurm.unreachable("sbatch: error: Batch job submission failed: Unable to contact slurm controller "
                             "(connect failure)")
    assert ge.unreachable("error: commlib error: got select error (Connection refused); Unable to run job: unable "
                          "to send message to qmaster using port 6444 on host \"vm\": got send error")
    assert not slurm.unreachable("sbatch: error: Batch job submission failed: Invalid partition name specified")
    assert not slurm.unreachable("sbatch: error: Batch job submission failed: Socket timed out on send/recv "
                                 "operation")  # it may have queued the job: no second one


def test_queue_states_from_each_schedulers_output():
    """squeue/qstat output as each prints it (PBS Pro's `qstat -x` shortens a long server name with '*')."""
    squeue = "812|RUNNING|None\n813|PENDING|Dependency\n"
    assert scheduler_named("slurm").parse_states(squeue, ["812", "813"]) == \
        {"812": ("running", ""), "813": ("pending", "Dependency")}
    qstat_ge = ("job-ID  prior   name       user         state submit/start at     queue  slots ja-task-ID\n"
                "-----------------------------------------------------------------------------------------\n"
                "     77 0.55500 keizoku-ru root         r     05/01/2025 10:00:01 all.q@vm   2\n"
                "     78 0.00000 keizoku-ru root         hqw   05/01/2025 10:00:01            2\n")
    assert scheduler_named("gridengine").parse_states(qstat_ge, ["77", "78", "79"]) == \
        {"77": ("running", ""), "78": ("held (waiting for the previous job)", "")}
    qstat_pbs = ("Job id            Name             User              Time Use S Queue\n"
                 "----------------  ---------------- ----------------  -------- - -----\n"
                 "412345.pbs*       keizoku-llama    user1             01:02:03 F rt_HF\n"
                 "412346.pbs*       keizoku-llama    user1                    0 H rt_HF\n")
    assert scheduler_named("pbs").parse_states(qstat_pbs, ["412345.pbs1", "412346.pbs1"]) == \
        {"412346.pbs1": ("held (waiting for the previous job)", "")}  # finished: job_ends tells how
    with pytest.raises(schedulers.QueryError, match="local has no queue"):
        scheduler_named("local").job_states(["local-1"])


def test_job_ends_from_each_schedulers_accounting():
    """How a job that left the queue ended: `scontrol -o show job` and `qacct -j` as printed by the real Slurm and
    Grid Engine here (a batch shell killed with SIGKILL; a held job cancelled; a Grid Engine job whose batch shell
    was killed, with a `qrsh -inherit` task record before its own), and PBS Pro's `qstat -x -f`."""
    slurm, ge, pbs = (scheduler_named(n) for n in ("slurm", "gridengine", "pbs"))
    killed = (DATA / "slurm-killed.scontrol").read_text()
    job = killed.split("JobId=")[1].split()[0]
    end = slurm.parse_scontrol(killed, job)
    assert (end.state, end.exit_status, end.signal, end.host, end.how()) == ("failed", 137, 9, "node1",
                                                                             "killed by SIGKILL")
    assert end.words == "slurm: FAILED, ExitCode 0:9, JobLaunchFailure"
    cancelled = (DATA / "slurm-cancelled.scontrol").read_text()
    end = slurm.parse_scontrol(cancelled, cancelled.split("JobId=")[1].split()[0])
    assert (end.state, end.words) == ("cancelled", "slurm: CANCELLED, ExitCode 0:0, Dependency")
    assert slurm.parse_scontrol(killed.replace("JobState=FAILED", "JobState=RUNNING"), job) is None
    assert slurm.parse_scontrol(killed, "1") is None
    end = ge.parse_qacct((DATA / "gridengine.qacct").read_text())
    assert (end.state, end.exit_status, end.signal, end.host) == ("failed", 137, 9, "vm")
    assert end.words == "qacct: failed 100 : assumedly after job, exit_status 137 (Killed)"
    timeout = ge.parse_qacct("=====\nhostname r1n1\nfailed 37  : qmaster enforced h_rt limit\nexit_status 137\n")
    assert (timeout.state, timeout.signal) == ("timeout", 9)
    deleted = ge.parse_qacct("=====\nhostname r1n1\nfailed 0\nexit_status 0\ndeleted_by user1@login1\n")
    assert deleted.state == "cancelled" and ge.parse_qacct("") is None
    qstat_xf = ("Job Id: 412345.pbs1\n    Job_Name = keizoku-llama\n    job_state = F\n"
                "    exec_host = hnode017/0*8+hnode001/0*8\n    Exit_status = 271\n\n"
                "Job Id: 412346.pbs1\n    job_state = F\n    Exit_status = 0\n\n"
                "Job Id: 412347.pbs1\n    job_state = F\n\n"
                "Job Id: 412348.pbs1\n    job_state = R\n    Exit_status = 0\n")
    ends = pbs.parse_ends(qstat_xf, ["412345.pbs1", "412346.pbs1", "412347.pbs1", "412348.pbs1"])
    assert sorted(ends) == ["412345.pbs1", "412346.pbs1"]  # deleted before it ran; still running
    assert (ends["412345.pbs1"].how(), ends["412345.pbs1"].host) == ("killed by SIGTERM", "hnode017")
    assert ends["412346.pbs1"].state == "completed"


def test_walltime_format_is_each_schedulers():
    """Slurm takes D-HH:MM:SS as written; Grid Engine's h_rt and PBS's walltime get it as HH:MM:SS (qsub would
    refuse the job); what no scheduler can take is refused, naming the key and what to write."""
    assert profile.load_profile("slurm", ["walltime=1-00:00:00"]).walltime == "1-00:00:00"
    assert scheduler_named("slurm").walltime_seconds("1-02:00:00") == 93600
    for name in ("tsubame4", "abci3"):
        assert profile.load_profile(name, ["group=g1", "walltime=1-00:00:00"]).walltime == "24:00:00"
        assert profile.load_profile(name, ["group=g1", "walltime=2-06:30:00"]).walltime == "54:30:00"
        assert profile.load_profile(name, ["group=g1", "walltime=36:00:00"]).walltime == "36:00:00"
    for bad, why in (("1:90:00", r"a field out of range .*; write 02:30:00"),
                     ("1-30:00:00", r"a field out of range .*; write 54:00:00"),
                     ("00:00:00", r"no time at all"), ("1-00:00", r"not HH:MM:SS or D-HH:MM:SS"),
                     ("90", r"not HH:MM:SS or D-HH:MM:SS \(in a YAML file, quote it")):
        with pytest.raises(profile.ProfileError, match=rf"profile tsubame4: walltime \(--walltime; gridengine's -l "
                                                       rf"h_rt\): '{bad}' (has |is ){why}"):
            profile.load_profile("tsubame4", ["group=g1", f"walltime={bad}"])
    assert schedulers.format_walltime(2 * 86400 + 61) == "48:01:01"


def test_every_scheduler_keeps_the_protocol():
    """Each registered scheduler: its native starter is one the driver has and one it allows; a profile may
    name it; a starter it does not allow is refused, naming the scheduler that does."""
    assert list(schedulers.SCHEDULERS)[-1] == "local"  # the fallback, claimed by no environment
    for name, s in schedulers.SCHEDULERS.items():
        assert s.name == name and s.native_starter in driver.STARTERS and s.native_starter in s.starters
        assert set(s.starters) <= set(driver.STARTERS)
        assert not s.in_job({})
    with pytest.raises(profile.ProfileError, match=r"starter: qrsh needs scheduler: gridengine \(with scheduler: "
                                                   r"slurm use srun, mpirun, ssh or local\)"):
        profile.load_profile("slurm", ["starter=qrsh"])
    with pytest.raises(profile.ProfileError, match=r"starter: srun needs scheduler: slurm \(with scheduler: "
                                                   r"local use local, mpirun or ssh\)"):
        profile.load_profile("local", ["starter=srun"])
    with pytest.raises(profile.ProfileError, match=r"nodes: scheduler local with starter local runs on this machine"):
        profile.load_profile("local", ["nodes=2"])


def test_launch_refuses_a_starter_of_another_scheduler(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"run_dir: {tmp_path}/run\nmodel: {{hf_path: m}}\ndata: {{mock: true}}\ntrain: {{max_steps: 5}}\n")
    proc = cli("launch", cfg, "--starter", "qrsh", env={"KEIZOKU_LOCAL_JOB_ID": "x1"})
    assert proc.returncode == 2 and "starter: qrsh needs scheduler: gridengine" in proc.stderr, proc.stderr
    assert not (tmp_path / "run" / "jobs").exists()  # refused before anything ran


def test_dry_run_prints_the_script_and_writes_nothing(tmp_path):
    """--dry-run shows the job script, the plan the driver would read, what the driver would start in a job
    (mpirun/srun/the node agents, with the variables torchrun would set) and the submit commands; it writes
    nothing. A walltime in days is written as HH:MM:SS for PBS; one that no scheduler takes is refused (exit 2)."""
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"run_dir: {tmp_path}/run\nmodel: {{hf_path: m}}\ndata: {{mock: true}}\ntrain: {{max_steps: 5}}\n")
    proc = cli("submit", cfg, "--profile", "abci3", "--set", "group=gaa1", "-N", "2", "--chain", "3",
               "--walltime", "1-00:00:00", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "#PBS -l select=2" in out and "#PBS -P gaa1" in out and "#PBS -q rt_HF" in out
    assert "#PBS -l walltime=24:00:00" in out and "#PBS -l walltime=1-" not in out
    assert out.count("#   qsub") == 3 and "depend=afterany:<job 2>" in out
    plan = json.loads("\n".join(line[4:] for line in out.split("which the launch driver reads:\n")[1]
                                .split("\n# in each job")[0].splitlines()))
    assert plan["walltime_s"] == 86400 and plan["starter"] == "mpirun" and plan["run_dir"] == f"{tmp_path}/run"
    assert f"--hostfile {tmp_path}/run/launch/hostfile.JOB_ID" in out and " -np 2 -npernode 1 " in out
    assert "-m keizoku.launch.agent --nnodes 2 --nproc-per-node 8 --master-addr NODE0 --master-port PORT" in out
    assert f"#   RANK=0..15 WORLD_SIZE=16 MASTER_ADDR=NODE0 MASTER_PORT=PORT {sys.executable} -m keizoku train " \
           f"{cfg}" in out
    assert not (tmp_path / "run").exists()
    slurm = cli("submit", cfg, "--profile", "slurm", "-N", "2", "--set", "launcher=mpi", "--dry-run").stdout
    assert "#   srun --nodes=2 --ntasks=16 --ntasks-per-node=8 --kill-on-bad-exit=1 " in slurm
    proc = cli("submit", cfg, "--profile", "tsubame4", "--dry-run")
    assert proc.returncode == 2 and "group: required by this profile" in proc.stderr
    proc = cli("submit", cfg, "train.max_steps=0", "--profile", "slurm", "--dry-run")
    assert proc.returncode == 2 and "train.max_steps: must be at least 1" in proc.stderr
    proc = cli("submit", cfg, "--profile", "tsubame4", "--set", "group=g1", "--walltime", "1-30:00:00", "--dry-run")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "error: profile tsubame4: walltime (--walltime; gridengine's -l h_rt): '1-30:00:00' has a field out " \
           "of range (minutes and seconds 0-59, hours 0-23 after a day); write 54:00:00" in proc.stderr


def test_status_tells_a_lost_driver_by_its_pid_and_its_heartbeat(tiny, tmp_path):
    """No scheduler to ask: a launch whose driver is killed with -9 is lost at once, seen from its host (its
    pid is gone), and leaves no process behind; seen from elsewhere, once its heartbeat is older than
    STALE_AFTER_S. A failed rank is named in the status."""
    run = tmp_path / "run"
    cfg = write_config(tiny, run, max_steps=100000)
    proc = subprocess.Popen([sys.executable, "-m", "keizoku", "launch", str(cfg)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "KEIZOKU_LOCAL_JOB_ID": "gone1",
                                                            "KEIZOKU_HOSTS": "localhost,localhost"})
    try:
        record = wait_until(lambda: job_records(run).get("gone1", {}).get("driver_pid"), 60, "the driver's record")
        assert record == proc.pid
        wait_until(lambda: len(_worker_pids(cfg)) == 2, 60, "two training processes")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        wait_until(lambda: not _worker_pids(cfg), 10, "the training processes to die with the driver")
    finally:
        if proc.poll() is None:
            proc.kill()
    status = cli("status", run)
    assert status.returncode == 0 and "Traceback" not in status.stderr, status.stderr
    line = next(line for line in status.stdout.splitlines() if line.startswith("job gone1 "))
    assert line == (f"job gone1 lost: the launch driver (pid {proc.pid} on {socket.gethostname()}) is gone: it "
                    f"recorded no end (last heartbeat {line.split('last heartbeat ')[1].split(' ago')[0]} ago); see the "
                    f"output of keizoku submit or keizoku launch; submit again: the run starts from the beginning "
                    f"(no checkpoint yet)")
    # as its record reads from another host: running while its heartbeat is fresh, lost once it is stale
    rec_path = run / "jobs" / "gone1.json"
    rec = json.loads(rec_path.read_text())
    rec.update(driver_host="node9", heartbeat=time.time() - 60)
    rec_path.write_text(json.dumps(rec))
    job = json.loads(cli("status", run, "--json").stdout)["jobs"][0]
    assert (job["state"], job["detail"], job["advice"]) == ("running", "", "")
    rec["heartbeat"] = time.time() - 600
    rec_path.write_text(json.dumps(rec))
    job = json.loads(cli("status", run, "--json").stdout)["jobs"][0]
    assert (job["state"], job["detail"]) == ("lost", "no heartbeat from the launch driver on node9 for 10 min (more "
                                                     "than 2 min): killed, hung, or its node is down")


# --- real launches over loopback ----------------------------------------------------------------------------------

def test_two_node_agents_rendezvous_over_loopback(tiny, tmp_path):
    """Two node agents (two "nodes" on this host) x one process: a real env:// rendezvous between them."""
    run = tmp_path / "run"
    cfg = write_config(tiny, run, max_steps=4)
    t0 = time.monotonic()
    proc = cli("launch", cfg, env={"KEIZOKU_HOSTS": "localhost,localhost", "KEIZOKU_LOCAL_JOB_ID": "lo1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 node(s) [localhost, localhost] × 1 process(es) = world size 2" in proc.stderr
    records = train_records(run)
    assert [r["step"] for r in records] == [1, 2, 3, 4] and world_size(records[-1]) == 2
    job = job_records(run)["lo1"]
    assert job["state"] == "completed" and job["exit_status"] == 0 and job["world_size"] == 2
    assert (run / "checkpoints/step_00000004/trainer_state.json").exists()
    first = time.monotonic() - t0
    t0 = time.monotonic()
    again = cli("launch", cfg)  # a spare chained job: nothing starts
    assert again.returncode == 0 and "training is complete (step 4 of 4); nothing to run" in again.stderr
    assert time.monotonic() - t0 < min(10.0, first)


def _worker_pids(cfg: Path) -> dict[int, int]:
    """{rank: pid} of the training processes of a config, from /proc."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
            env = dict(kv.split(b"=", 1) for kv in (entry / "environ").read_bytes().split(b"\0") if b"=" in kv)
        except OSError:
            continue
        if b"train" in cmd and str(cfg).encode() in cmd and b"RANK" in env:
            found[int(env[b"RANK"])] = int(entry.name)
    return found


def test_a_killed_rank_ends_the_launch_quickly(tiny, tmp_path):
    run = tmp_path / "run"
    cfg = write_config(tiny, run, max_steps=100000)
    proc = subprocess.Popen([sys.executable, "-m", "keizoku", "launch", str(cfg), "--nproc-per-node", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: len(train_records(run)) >= 2, 120, "two training steps",
                   on_timeout=lambda: proc.poll() is not None and proc.stdout.read() or "")
        pids = _worker_pids(cfg)
        assert sorted(pids) == [0, 1]
        os.kill(pids[1], signal.SIGKILL)
        t0 = time.monotonic()
        status = proc.wait(timeout=90)
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    out = proc.stdout.read()
    assert status == 137, out  # the killed rank's status, 128 + SIGKILL
    assert "rank 1" in out and "killed by SIGKILL" in out
    assert elapsed < 60, f"took {elapsed:.0f} s"
    assert not _worker_pids(cfg), "a training process outlived the launch"
    host = socket.gethostname()
    rec = next(iter(job_records(run).values()))
    assert (rec["state"], rec["exit_status"], rec["detail"]) == ("failed", 137, f"rank 1 on {host} killed by SIGKILL")
    assert (rec["failure"]["rank"], rec["failure"]["signal"], rec["failure"]["node_rank"]) == (1, "SIGKILL", 0)
    line = next(line for line in cli("status", run).stdout.splitlines() if line.startswith("job "))
    assert line.endswith(f" failed: rank 1 on {host} killed by SIGKILL; see the output of keizoku submit or keizoku "
                         f"launch; fix the cause and submit again: the run starts from the beginning (no checkpoint "
                         f"yet)")


def test_walltime_signal_saves_then_a_local_chain_resumes(tiny, tmp_path):
    """SIGUSR2 (Grid Engine's -notify) to the driver: every rank saves, exit 3; `submit --profile local`
    then resumes to the end; status reports it."""
    run = tmp_path / "run"
    cfg = write_config(tiny, run, max_steps=30)
    proc = subprocess.Popen([sys.executable, "-m", "keizoku", "launch", str(cfg), "--nproc-per-node", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "KEIZOKU_LOCAL_JOB_ID": "sig1"})
    try:
        wait_until(lambda: len(train_records(run)) >= 2, 120, "two training steps")
        proc.send_signal(signal.SIGUSR2)
        status = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = proc.stdout.read()
    assert status == 3, out
    assert "SIGUSR2 received: asking every node to save a checkpoint and stop" in out
    saved = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert len(saved) == 1 and 2 <= int(saved[0][5:]) < 30
    assert job_records(run)["sig1"]["state"] == "stopped after saving"

    sub = cli("submit", cfg, "--profile", "local", "--chain", "2")
    assert sub.returncode == 0, sub.stdout + sub.stderr
    assert f"resumed from {run}/checkpoints/{saved[0]}" in sub.stdout + sub.stderr
    assert train_records(run)[-1]["step"] == 30
    status = json.loads(cli("status", run, "--json").stdout)
    assert status["checkpoint_step"] == 30 and status["total_steps"] == 30 and status["last"]["step"] == 30
    states = {j["job_id"]: j["state"] for j in status["jobs"]}
    assert states["sig1"] == "stopped after saving"
    assert sorted(states.values()) == ["completed", "stopped after saving"]  # the chain stopped when complete
    table = cli("status", run).stdout
    assert "step 30 of 30" in table and "step_00000030" in table


def test_mpi_style_launch_with_open_mpi(tiny, tmp_path):
    """launcher: mpi — mpirun starts one process per slot; ranks come from OMPI_COMM_WORLD_*."""
    need("mpirun", why="Open MPI")
    prof = tmp_path / "ompi.yaml"
    prof.write_text(yaml.safe_dump({"base": "local", "launcher": "mpi", "starter": "mpirun", "procs_per_node": 2,
                                    "mpirun": ["mpirun", "--allow-run-as-root", "--oversubscribe"]}))
    run = tmp_path / "run"
    cfg = write_config(tiny, run, max_steps=3)
    proc = cli("launch", cfg, "--profile", prof, env={"KEIZOKU_LOCAL_JOB_ID": "mpi1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = train_records(run)
    assert records[-1]["step"] == 3 and world_size(records[-1]) == 2
    assert job_records(run)["mpi1"]["launcher"] == "mpi"


def test_container_wraps_training_and_runs_the_driver_standalone(tiny, tmp_path):
    """--container: the job script runs a copy of the driver with the node's python3 (no keizoku importable),
    and every keizoku process through `RUNTIME exec --nv -B ... IMAGE python`. Apptainer is not packaged for
    Debian 12, so a stand-in runtime records its arguments and runs the command after the image."""
    runtime = tmp_path / "apptainer"
    calls = tmp_path / "calls.txt"
    runtime.write_text("#!/bin/bash\n"
                       f"echo \"$*\" >> {calls}\n"
                       "[ \"$1\" = exec ] || exit 64; shift\n"
                       "while [ \"${1:-}\" = --nv ] || [ \"${1:-}\" = -B ]; do [ \"$1\" = -B ] && shift; shift; done\n"
                       "[ -f \"$1\" ] || { echo \"no image $1\" >&2; exit 65; }; shift\n"
                       "exec \"$@\"\n")
    runtime.chmod(0o755)
    image = tmp_path / "keizoku.sif"
    image.write_text("stand-in image")
    prof = tmp_path / "box.yaml"
    prof.write_text(yaml.safe_dump({"base": "local", "container": {"runtime": str(runtime), "python": sys.executable,
                                                                   "binds": ["/data"]}}))
    run = tmp_path / "run"
    cfg = write_config(tiny, run, max_steps=2)
    host_python = shutil.which("python3", path="/usr/bin:/bin")
    assert host_python and subprocess.run([host_python, "-c", "import keizoku"], capture_output=True).returncode != 0
    host_env = {**os.environ, "PATH": "/usr/bin:/bin"}
    proc = cli("submit", cfg, "--profile", prof, "--container", image, env=host_env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert train_records(run)[-1]["step"] == 2
    job_script = next((run / "submit").glob("*.sh"))
    assert "exec python3 " in job_script.read_text() and ".launch/driver.py --plan" in job_script.read_text()
    again = subprocess.run(["bash", str(job_script)], capture_output=True, text=True, env=host_env, timeout=120)
    assert again.returncode == 0 and "training is complete (step 2 of 2)" in again.stderr, again.stderr
    lines = calls.read_text().splitlines()
    assert any("keizoku.launch.status total-steps" in c for c in lines)  # the completeness check, inside
    agent = next(c for c in lines if "keizoku.launch.agent" in c)
    assert agent.startswith(f"exec --nv -B {tmp_path} -B {run} ") and f"-B /data {image} {sys.executable}" in agent


def test_driver_modules_need_only_the_standard_library_of_python_3_8(tmp_path):
    """The driver runs on a compute node's own python3 under --container (RHEL 9: 3.9; checked as 3.8): the
    files submit copies (LAUNCH_FILES) parse as Python 3.8, import only the standard library and each other (the
    driver: keizoku's modules, else the copies beside it), and import so without site-packages."""
    import ast

    names = {f.name for f in submit.LAUNCH_FILES}
    assert names == {"driver.py", "schedulers.py", "port.py", "rundir.py"}
    siblings = {n[:-3] for n in names}
    for path in submit.LAUNCH_FILES:
        tree = ast.parse(path.read_text(), feature_version=(3, 8))
        guarded = {id(n) for t in ast.walk(tree) if isinstance(t, ast.If) and getattr(t.test, "id", "") ==
                   "TYPE_CHECKING" for b in t.body for n in ast.walk(b)}  # annotations only, never run
        imports = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) not in guarded]
        imported = {a.name.split(".")[0] for n in imports if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module.split(".")[0] for n in imports if isinstance(n, ast.ImportFrom) and n.module}
        allowed = siblings | ({"keizoku"} if path.name == "driver.py" else set())
        assert imported - allowed <= set(sys.stdlib_module_names), path.name
        shutil.copy(path, tmp_path / path.name)
    check = "import sys, driver; assert 'keizoku' not in sys.modules; print(driver.STARTERS)"
    proc = subprocess.run([sys.executable, "-S", "-c", check], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0 and "srun" in proc.stdout, proc.stderr
