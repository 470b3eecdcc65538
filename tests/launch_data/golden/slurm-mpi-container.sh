#!/bin/bash
#SBATCH --job-name=keizoku-llama-ja
#SBATCH --output=/work/proj/runs/llama-ja/logs/slurm-%j.out
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --time=24:00:00
#SBATCH --gpus-per-node=8
#SBATCH --signal=B:USR1@300
#SBATCH --exclusive

# Written by keizoku VERSION submit (slurm):
#   keizoku submit configs/run.yaml optim.lr=1e-5 ...
# Each link of a chain runs this same script and resumes from the newest checkpoint;
# the launch driver exits 0 at once when training is complete, 3 after a walltime save.

export NCCL_ASYNC_ERROR_HANDLING=1
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1

cd /work/proj
exec python3 /work/proj/runs/llama-ja/submit/20250101-000000.launch/driver.py --plan /work/proj/runs/llama-ja/submit/20250101-000000.plan.json

# plan:
{
 "train_args": [
  "/work/proj/configs/run.yaml",
  "optim.lr=1e-5"
 ],
 "run_dir": "/work/proj/runs/llama-ja",
 "total_steps": 1000,
 "launcher": "mpi",
 "starter": "srun",
 "procs_per_node": 8,
 "python": [
  "apptainer",
  "exec",
  "--nv",
  "-B",
  "/work/proj",
  "-B",
  "/work/proj/runs/llama-ja",
  "-B",
  "/work/proj/configs",
  "/work/proj/images/keizoku.sif",
  "python"
 ],
 "mpirun": [
  "mpirun"
 ],
 "env": {
  "NCCL_ASYNC_ERROR_HANDLING": "1",
  "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"
 },
 "walltime_s": 86400,
 "stop_margin_s": 0,
 "failure_grace_s": 60.0,
 "workdir": "/work/proj"
}
