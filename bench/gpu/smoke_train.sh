# GPU smoke test of `keizoku train` + `keizoku export` on one GPU of the device tool (not a benchmark).
#
# Prepare, from the repository root (both folders ignored via .git/info/exclude, carried by the device call):
#   .whl/  megatron-core 0.16.1 (cp312 manylinux wheel), omegaconf 2.4.0, antlr4-python3-runtime 4.9.3
#          (pip download --no-deps --only-binary=:all: --python-version 3.12 ...; antlr4: pip wheel --no-deps)
#   .gpu/data/  the bundled samples tokenized with the bundled tokenizer:
#          keizoku tokenize src/keizoku/assets/data/*.jsonl.gz -t src/keizoku/assets/tokenizer -o .gpu/data
# Run:  device run "bash bench/gpu/smoke_train.sh" with carry [".whl", ".gpu"] (the wheels of bench/megatron/README.md
#       do too: megatron-core 0.19.2, omegaconf 2.4.0, ...)
# 2026-11-28, 1x H100 80GB: a 138M-parameter Llama shape, seq 1024, global batch 16: bf16 FSDP2, ~60k tokens/s,
# loss 9.20 -> 7.57 (ja eval) in 40 steps, data-loader share 0.3%, checkpoint/resume at step 25, export verified
# (max logit difference 0).
set -e
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 - <<'PY'
import torch, shutil
from transformers import LlamaConfig, AutoModelForCausalLM
torch.manual_seed(0)
m = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=8002, hidden_size=1024, intermediate_size=4096, num_hidden_layers=8,
    num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=2048, bos_token_id=8000, eos_token_id=8001))
m.save_pretrained("/tmp/tiny")
for f in ["tokenizer.json", "tokenizer_config.json"]: shutil.copy(f"src/keizoku/assets/tokenizer/{f}", "/tmp/tiny")
print("params", sum(p.numel() for p in m.parameters()))
PY
cat > /tmp/cfg.yaml <<'Y'
run_dir: /tmp/run
model: {hf_path: /tmp/tiny}
data:
  blend: [{path: .gpu/data/ja_sample_text_document, weight: 0.9}, {path: .gpu/data/en_sample_text_document, weight: 0.1}]
  validation: {ja: [{path: .gpu/data/ja_sample_text_document}]}
  seq_length: 1024
  num_workers: 2
train: {global_batch_size: 16, micro_batch_size: 4, max_steps: 40}
optim: {lr: 1.0e-3, min_lr: 1.0e-4}
schedule: {warmup_steps: 5}
checkpoint: {interval: 20}
eval: {interval: 20, batches: 4}
logging: {interval: 5, tensorboard: true}
Y
python3 -c "import sys; from keizoku.config import load_config; from keizoku.engines import train; sys.exit(train(load_config('/tmp/cfg.yaml', ['train.max_steps=25'])))" 2>&1 | grep -vi warn
echo "exit=$?"
python3 -c "import sys; from keizoku.config import load_config; from keizoku.engines import train; sys.exit(train(load_config('/tmp/cfg.yaml')))" 2>&1 | grep -vi warn
python3 -c "from keizoku.engines import export; print(export('/tmp/run', '/tmp/hf'))" 2>&1 | grep -vi "warn\|Loading\|Writing"
# FP8 (torchao) and a profiled step: 10 steps, step 5 under torch.profiler
python3 -c "import sys; from keizoku.config import load_config; from keizoku.engines import train; sys.exit(train(load_config('/tmp/cfg.yaml', ['run_dir=/tmp/run-fp8', 'train.max_steps=10', 'model.fp8=tensorwise', 'logging.profile_step=5', 'checkpoint.interval=0', 'eval.interval=0'])))" 2>&1 | grep -vi warn
cp /tmp/run/metrics.jsonl $OUT/
ls -a /tmp/run/checkpoints /tmp/run/checkpoints/* /tmp/run/tensorboard /tmp/run-fp8/profile
