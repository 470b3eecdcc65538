# Lays out .bench-base/tokenize/ (ignored by .gitignore's ".bench-base/"): everything bench/tokenize/gpu.sh needs on
# the device tool's GPU machine, which reaches no network and receives only the working tree and carried paths.
# Run here, from the repository root, where PyPI and a Megatron-LM git repository are at hand:
#
#   bash bench/tokenize/prepare_gpu.sh /path/to/Megatron-LM [FAST_REV]
#
# MEGATRON-LM: a git repository (clone or mirror) of NVIDIA/Megatron-LM. Written:
#   megatron.tar.gz       `git archive core_v0.16.1 megatron tools`: preprocess_data.py, as the earlier results used
#   megatron-fast.tar.gz  `git archive FAST_REV megatron tools` (default: the repository's HEAD; it must hold
#                         tools/preprocess_data_fast.py, PR #6514, merged as 889c909922): both tarballs record their
#                         commit (bench.py reads it from the archive's header)
#   whl/                  Python 3.12 x86_64 wheels the machine lacks (KINDS.md's package list): keizoku's isal,
#                         orjson, zstandard, omegaconf (+antlr4); gigatoken 0.10.0 (abi3) and the awkward arrays
#                         Megatron's add_documents needs; pydantic and dill, which Megatron-LM's newest tree imports
#   tokenizers.tar.gz     ../shared/tokenizers/{llama3.1,llm-jp-3}
#   ja_sample.jsonl.gz    ../shared/data/ja_sample.jsonl.gz, the corpora's paragraphs
# About 30 MB; with the tracked files well under the device tool's 64 MiB. Megatron-LM's code lives only there and
# in bench.py's work directory, never in this repository.
set -eu
MLM=${1:?usage: prepare_gpu.sh MEGATRON-LM-GIT-REPO [FAST_REV]}
FAST_REV=${2:-HEAD}
SHARED=${SHARED:-$(cd "$(dirname "$0")/../../.." && pwd)/shared}
B=.bench-base/tokenize
mkdir -p $B/whl
git -C "$MLM" cat-file -e "$FAST_REV:tools/preprocess_data_fast.py" || { echo "$FAST_REV has no tools/preprocess_data_fast.py"; exit 1; }
git -C "$MLM" archive --format=tar.gz -o "$PWD/$B/megatron.tar.gz" core_v0.16.1 megatron tools LICENSE
git -C "$MLM" archive --format=tar.gz -o "$PWD/$B/megatron-fast.tar.gz" "$FAST_REV" megatron tools LICENSE
echo "megatron-fast: $(git -C "$MLM" rev-parse "$FAST_REV")"

rm -f $B/whl/*.whl
# one version of each, cp312 (the machine's python3 is 3.12); --no-deps: each dependency is named
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d $B/whl \
  isal==1.9.1 orjson==3.13.0 zstandard==0.25.0 omegaconf==2.4.0 \
  gigatoken==0.10.0 awkward==2.14.0 awkward-cpp==57 \
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 dill==0.4.1
# omegaconf's antlr4 runtime is on PyPI as a source distribution only (pure Python): built here
python3 -m pip wheel -q --no-deps -w $B/whl antlr4-python3-runtime==4.9.3

tar -czf $B/tokenizers.tar.gz -C "$SHARED/tokenizers" llama3.1 llm-jp-3
cp "$SHARED/data/ja_sample.jsonl.gz" $B/
du -sh $B/* $B/whl/* | sort -k2; du -sh $B
