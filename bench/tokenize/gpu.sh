# bench/tokenize on the device tool's GPU machine (nvidia-h200: 16 cores, 128 GiB, 64 GiB disk, Python 3.12 with
# torch, transformers, tokenizers; no network), from the repository root, results under $OUT. Needs
# .bench-base/tokenize/ (bench/tokenize/prepare_gpu.sh, run beforehand where PyPI and Megatron-LM are at hand):
# carry [".bench-base"] (~27 MB; ~35 MB with the tracked files: under the 64 MiB a call may move).
#
#   bash bench/tokenize/gpu.sh                       # all steps: main, memory, decompress (~8-9 min)
#   bash bench/tokenize/gpu.sh main                  # or any of them, in the order given
#   BENCH_ARGS="--megatron-w1" bash bench/tokenize/gpu.sh main    # more bench.py options for main and memory
#
# Steps, each under its own time limit (a step cut short still leaves its JSON, rewritten after every run, and
# bench.py prints the tables of what it measured before it stops):
#   main        bench.py --phases main: 400 MB corpora, the slow tools on a 100 MB slice, N = 16   (~5 min, <= 330 s)
#   memory      bench.py --phases memory: a 4 GB non-repeating corpus, peak memory at N = 16       (~2 min, <= 150 s)
#   decompress  decompress_speed.py on a 200 MB sample (.gz, .zst): the decompressors, --overlap   (~1 min, <= 80 s)
# With setup (~30 s) the limits add up to 590 s: one device call (timeout_s 600) holds them all.
set -u
B=.bench-base/tokenize
W=/tmp/kb
[ -d $B/whl ] || { echo "no $B: run bench/tokenize/prepare_gpu.sh here first, and carry .bench-base"; exit 1; }
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $B/whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 setup.py build_ext --inplace -q 2>&1 | grep -i error  # keizoku's C tokenizers, for this Python
mkdir -p $W/tk && tar -xzf $B/tokenizers.tar.gz -C $W/tk
nproc; lscpu | grep -i "model name"; free -g | head -2; df -h /tmp | tail -1
python3 -c "import keizoku.data.readers as r, keizoku._bpe, keizoku._unigram; print('decompressors', r.decompressor('gzip'), r.decompressor('zstd'))"
echo "=== setup $(( $(date +%s) - t0 )) s"
BENCH="python3 bench/tokenize/bench.py --sample $B/ja_sample.jsonl.gz --tokenizers $W/tk/llama3.1,$W/tk/llm-jp-3
  --megatron $B/megatron.tar.gz --megatron-fast $B/megatron-fast.tar.gz --workdir $W ${BENCH_ARGS:-}"
for step in ${@:-main memory decompress}; do
  echo "=== $step $(date +%T)"
  case $step in
    decompress) timeout -k 5 55 python3 bench/tokenize/decompress_speed.py --make $W/dz --sample $B/ja_sample.jsonl.gz \
                  --make-mb 200 --repeats 1 --json $OUT/decompress.json 2>&1 | tee $OUT/decompress.md
                timeout -k 5 25 python3 bench/tokenize/decompress_speed.py --overlap $W/dz/ja.jsonl.gz $W/dz/ja.jsonl.zst \
                  --repeats 1 --json $OUT/decompress-overlap.json 2>&1 | tee -a $OUT/decompress.md
                rm -rf $W/dz ;;
    main)       timeout -k 10 330 $BENCH --phases main --json $OUT/tokenize-main.json > $OUT/tokenize-main.md
                echo "exit $?"; cat $OUT/tokenize-main.md ;;
    memory)     timeout -k 10 150 $BENCH --phases memory --json $OUT/tokenize-memory.json > $OUT/tokenize-memory.md
                echo "exit $?"; cat $OUT/tokenize-memory.md ;;
    *)          echo "unknown step $step" ;;
  esac
  echo "=== $step done $(date +%T), $(( $(date +%s) - t0 )) s in all"; df -h /tmp | tail -1
done
