# The scale benchmarks on the device tool's GPU machine (one H200, 16 cores, 128 GiB, 64 GiB disk), as run for
# bench/scale/README.md. Carry [".whl", ".gpu", ".bench-base"]: the wheels and tokenized samples of
# bench/gpu/smoke_train.sh, and the keizoku source before the change (git archive <commit> src | tar -x -C
# .bench-base). Each step is one argument, run in order, under its own time limit; results land in $OUT.
#   bash bench/scale/h200.sh load8b export3b        # one device call
#   bash bench/scale/h200.sh export8b stall3b export3b   # another
#   bash bench/scale/h200.sh stall3b-long             # the steady-state stall: one write ends between saves
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; df -h /tmp | tail -1; free -g | head -2
BASE=$PWD/.bench-base/src
for step in "$@"; do
  echo "=== $step $(date +%T)"
  case $step in
    load8b)   timeout 330 python3 bench/scale/load_model.py --shape 8b --work /tmp/lm --out $OUT
              rm -rf /tmp/lm ;;
    export3b) timeout 140 python3 bench/scale/export.py --shape 3b --work /tmp/bx --baseline-src $BASE \
                --variant= --json $OUT/export-3b.json ;;
    export8b) timeout 170 python3 bench/scale/export.py --shape 8b --work /tmp/bx --no-base-weights \
                --variant= --json $OUT/export-8b.json ;;
    export3b-new) timeout 140 python3 bench/scale/export.py --shape 3b --work /tmp/bx --variant= \
                --json $OUT/export-3b-new.json ;;
    stall3b-async) timeout 290 python3 bench/scale/checkpoint_stall.py --shape 3b --seq 4096 --global-batch 4 \
                --interval 4 --saves 2 --warmup 1 --variants async --data .gpu/data --out $OUT model.compile=false ;;
    stall1b-async) timeout 100 python3 bench/scale/checkpoint_stall.py --shape 1b --seq 4096 --global-batch 4 \
                --interval 25 --saves 2 --warmup 2 --variants async --data .gpu/data --out $OUT model.compile=false ;;
    stall3b-long) timeout 560 python3 bench/scale/checkpoint_stall.py --shape 3b --seq 4096 --global-batch 4 \
                --interval 25 --saves 3 --warmup 2 --variants async sync --data .gpu/data --out $OUT model.compile=false ;;
    write20)  timeout 300 python3 bench/scale/write_speed.py --gib 20 --work /tmp/ws --writers 1 8 --out $OUT
              rm -rf /tmp/ws ;;
    stall3b)  timeout 290 python3 bench/scale/checkpoint_stall.py --shape 3b --seq 4096 --global-batch 4 \
                --interval 4 --saves 2 --warmup 1 --variants base async --baseline-src $BASE --data .gpu/data \
                --out $OUT model.compile=false ;;
  esac
  rm -rf /tmp/bx /tmp/kz-stall-*  # what a step cut short by its time limit left
  echo "=== $step done (exit $?) $(date +%T)"; df -h /tmp | tail -1
done
