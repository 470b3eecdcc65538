#!/bin/bash
#$ -N keizoku-llama-ja
#$ -cwd
#$ -o /work/proj/runs/llama-ja/logs/
#$ -j y
#$ -S /bin/bash
#$ -notify
#$ -l h_rt=24:00:00
#$ -l node_f=2

# Written by keizoku VERSION submit (gridengine):
#   keizoku submit configs/run.yaml optim.lr=1e-5 ...
# Each link of a chain runs this same script and resumes from the newest checkpoint;
# the launch driver exits 0 at once when training is complete, 3 after a walltime save.

. /etc/profile.d/modules.sh
module load cuda openmpi

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
 "procs_per_node": 4,
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
 "walltime_s": 86400,
 "stop_margin_s": 600,
 "failure_grace_s": 60.0,
 "workdir": "/work/proj"
}
