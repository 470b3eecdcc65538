#!/usr/bin/env bash
# Test harness for the lent GPU machines, which have no Transformer Engine (TE): install the carried wheels
# (.whl/, see README.md), apply the harness-only workarounds, run gpu_check.py. Not for users: inside the NeMo
# container TE is present and none of this applies; keizoku itself contains none of it.
set -euo pipefail
cd "$(dirname "$0")/../.."
SITE=/tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
# workaround: pretrain() runs `make` in megatron/core/datasets to build the index helper; the PyPI wheel ships
# the helper built but no Makefile
printf 'all:\n\t@true\n' > "$SITE/megatron/core/datasets/Makefile"
# workaround: bench/megatron/site/sitecustomize.py guards Bridge's top-level TE imports in every process
export PYTHONPATH="$PWD/bench/megatron/site:$SITE:$PWD/src"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python3 -c "import sys, torch, transformers; print('python', sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__)"
python3 bench/megatron/gpu_check.py "$@"
