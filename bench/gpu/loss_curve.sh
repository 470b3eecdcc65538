# FP8 / bf16-state vs BF16 loss curves of `keizoku train` on the device tool (loss_curve.py); see README.md.
#
# Prepare, from the repository root (ignored via .git/info/exclude, carried by the device call), besides the
# .bench-gpu/ wheels of bench_train.sh:
#   .bench-gpu/data-llama31/      keizoku tokenize ../shared/data/ja_sample.jsonl.gz ../shared/data/en_sample.jsonl.gz
#                                   -t ../shared/tokenizers/llama3.1 -o .bench-gpu/data-llama31
#   .bench-gpu/tokenizer-llama31/ tokenizer.json and tokenizer_config.json of ../shared/tokenizers/llama3.1
#   .bench-gpu/plot/              matplotlib and its dependencies (cp312 wheels; installed only where the image
#                                 lacks matplotlib; without them loss_curve.png is left to `loss_curve.py --report`)
# Run:  device run "bash bench/gpu/loss_curve.sh [loss_curve.py options]" with carry [".bench-gpu"]
set -e
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .bench-gpu/*.whl
if ! python3 -c "import matplotlib" 2>/dev/null && ls .bench-gpu/plot/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .bench-gpu/plot/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
python3 bench/gpu/loss_curve.py "$@"
