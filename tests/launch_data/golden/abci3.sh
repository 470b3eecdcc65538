#!/bin/bash
#PBS -N keizoku-llama-j
#PBS -o /work/proj/runs/llama-ja/logs/
#PBS -j oe
#PBS -q rt_HF
#PBS -l walltime=12:00:00
#PBS -P gaa50000
#PBS -l select=4

# Written by keizoku VERSION submit (pbs):
#   keizoku submit configs/run.yaml optim.lr=1e-5 ...
# Each link of a chain runs this same script and resumes from the newest checkpoint;
# the launch driver exits 0 at once when training is complete, 3 after a walltime save.

source /etc/profile.d/modules.sh
module load cuda hpcx

export TORCH_NCCL_ASYNC_ERROR_HANDLING=1

cd /work/proj
exec /opt/venv/bin/python -m keizoku.launch.driver --plan /work/proj/runs/llama-ja/submit/20250101-000000.plan.json

# plan:
{
 "train_args": [
  "/work/proj/configs/run.yaml",
  "optim.lr=1e-5"
 ],
 "run_dir": "/work/proj/runs/llama-ja",
 "total_steps": 1000,
 "launcher": "node",
 "starter": "mpirun",
 "procs_per_node": 8,
 "python": [
  "/opt/venv/bin/python"
 ],
 "mpirun": [
  "mpirun",
  "--bind-to",
  "none",
  "-x",
  "PATH",
  "-x",
  "LD_LIBRARY_PATH"
 ],
 "env": {
  "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"
 },
 "walltime_s": 43200,
 "stop_margin_s": 900,
 "failure_grace_s": 60.0,
 "workdir": "/work/proj"
}
