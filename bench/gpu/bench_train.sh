# Throughput benchmark of `keizoku train` (engine: torch) and its baselines on the device tool; see README.md.
#
# Prepare, from the repository root (ignored via .git/info/exclude, carried by the device call):
#   .bench-gpu/  megatron_core, omegaconf, antlr4 wheels (cp312; see smoke_train.sh) and data/ (the bundled samples
#                tokenized: keizoku tokenize src/keizoku/assets/data/*.jsonl.gz -t src/keizoku/assets/tokenizer
#                -o .bench-gpu/data)
# Run:  device run "bash bench/gpu/bench_train.sh [bench_train.py options]" with carry [".bench-gpu"]
set -e
# once per machine: two runs started side by side (one per GPU) must not reinstall under each other
[ -f /tmp/site/.keizoku-bench ] || { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .bench-gpu/*.whl && touch /tmp/site/.keizoku-bench; }
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True  # every variant (keizoku's own default, set for all)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
python3 bench/gpu/bench_train.py "$@" 2>&1 | grep -v -i "warn"
