"""Shared fixtures: real tokenizers and data, all from the repository (no hub, no ../shared)."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest-xdist's workers get COLUMNS=80: the CLI would wrap as in a terminal
    for _name in ("COLUMNS", "LINES"):
        os.environ.pop(_name, None)
ASSETS = Path(__file__).parent / "assets"
PACKAGE_ASSETS = ROOT / "src" / "keizoku" / "assets"
JA_SAMPLE = PACKAGE_ASSETS / "data" / "ja_sample.jsonl.gz"
EN_SAMPLE = PACKAGE_ASSETS / "data" / "en_sample.jsonl.gz"
SAMPLE_TOKENIZER = PACKAGE_ASSETS / "tokenizer"


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    os.environ["KEIZOKU_CACHE"] = str(tmp_path_factory.mktemp("keizoku-cache"))


@pytest.fixture(scope="session")
def tokenizer_dirs(tmp_path_factory) -> dict[str, Path]:
    """The Llama-3.1 (byte-level BPE) and llm-jp-3 (unigram) tokenizers, unpacked, plus the bundled one."""
    out = {"sample": SAMPLE_TOKENIZER}
    base = tmp_path_factory.mktemp("tokenizers")
    for name in ("llama3.1", "llm-jp-3"):
        dest = base / name
        shutil.copytree(ASSETS / "tokenizers" / name, dest)
        with gzip.open(dest / "tokenizer.json.gz", "rb") as src, open(dest / "tokenizer.json", "wb") as dst:
            shutil.copyfileobj(src, dst)
        (dest / "tokenizer.json.gz").unlink()
        out[name] = dest
    return out


def read_texts(path: Path, key: str = "text") -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)[key] for line in f]


@pytest.fixture(scope="session")
def ja_texts() -> list[str]:
    return read_texts(JA_SAMPLE)


@pytest.fixture(scope="session")
def en_texts() -> list[str]:
    return read_texts(EN_SAMPLE)


def write_jsonl(path: Path, rows: list, raw_lines: list[bytes] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in rows)
    if raw_lines:
        data += b"".join(raw_lines)
    if path.name.endswith(".gz"):
        data = gzip.compress(data)
    elif path.name.endswith(".zst"):
        import zstandard

        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    return path


def keizoku(*args: str, cwd: Path | None = None, check: bool = True, **kw) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess."""
    proc = subprocess.run([sys.executable, "-m", "keizoku", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"keizoku {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def tiny_llama_and_data(base: Path, samples=(JA_SAMPLE, EN_SAMPLE), **shape) -> Path:
    """BASE/model: a tiny Llama (random weights saved as a HF checkpoint, the bundled tokenizer beside them);
    BASE/data: ``samples`` tokenized with that tokenizer. ``shape`` overrides the LlamaConfig fields."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = dict(vocab_size=8002, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, bos_token_id=8000, eos_token_id=8001)
    AutoModelForCausalLM.from_config(LlamaConfig(**(config | shape))).save_pretrained(base / "model")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(SAMPLE_TOKENIZER / f, base / "model" / f)
    keizoku("tokenize", *samples, "-t", SAMPLE_TOKENIZER, "-o", base / "data", "-q")
    return base


def write_corpus(d: Path, ja: list[str], en: list[str], bad_lines: bool = False) -> Path:
    """Inputs for sharded runs: a gzip file, a large plain .jsonl (cut into byte ranges), a small one whose last line
    has no newline, and an empty one; ``bad_lines``: a malformed line, a blank one and one without the key in the
    large file, each in another third of it."""
    d.mkdir(parents=True, exist_ok=True)
    write_jsonl(d / "a.jsonl.gz", [{"text": t} for t in ja[:100]])
    big = [json.dumps({"text": t}, ensure_ascii=False).encode() for t in ja[100:] + en[:200]]
    if bad_lines:
        big[50], big[300], big[420] = b'{"text": broken', b"", b'{"title": "no text"}'
    (d / "big.jsonl").write_bytes(b"\n".join(big) + b"\n")
    (d / "c.jsonl").write_bytes(b"".join(json.dumps({"text": t}).encode() + b"\n" for t in en[200:260])
                                + b'{"text": "the last line, without a newline"}')
    (d / "empty.jsonl").write_bytes(b"")
    return d


# the longest test files first: `make test` runs files in two workers (pytest-xdist --dist loadfile), which take
# them in collection order, so the long ones start early and no worker is left alone with one at the end
LONGEST_FIRST = ("test_train.py", "test_checkpoint.py", "test_launch.py", "test_quickstart.py", "test_first_contact.py",
                 "test_launch_gridengine.py", "test_launch_slurm.py", "test_phases.py", "test_export.py",
                 "test_fault_errors.py", "test_downstream.py", "test_tokenize.py", "test_megatron.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's tests keep their order
