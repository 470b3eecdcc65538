"""Helpers for the launch tests: a tiny model and data, configs, scheduler availability, waiting."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import JA_SAMPLE, tiny_llama_and_data

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "launch_data"
REQUIRE = os.environ.get("KEIZOKU_REQUIRE_SCHEDULERS") == "1"  # set by .ci/run: a missing scheduler fails
SGE_ENV = {"SGE_ROOT": "/var/lib/gridengine", "SGE_CELL": "default"}


def need(*commands: str, why: str = "") -> None:
    """Skip (or, under KEIZOKU_REQUIRE_SCHEDULERS=1, fail) unless every command is on PATH."""
    missing = [c for c in commands if shutil.which(c) is None]
    if missing:
        reason = f"{', '.join(missing)} not installed{': ' + why if why else ''} (.ci/run installs and starts it)"
        if REQUIRE:
            pytest.fail(f"KEIZOKU_REQUIRE_SCHEDULERS=1 but {reason}")
        pytest.skip(reason)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    """A tiny Llama saved as a Hugging Face checkpoint, and the Japanese sample tokenized."""
    return tiny_llama_and_data(tmp_path_factory.mktemp("launch-tiny"), samples=(JA_SAMPLE,), hidden_size=32,
                               intermediate_size=64, max_position_embeddings=128)


def write_config(tiny: Path, run_dir: Path, max_steps: int, interval: int = 0) -> Path:
    """Seconds of training on two ranks: 32-token sequences, a global batch of 4."""
    cfg = {"run_dir": str(run_dir), "model": {"hf_path": str(tiny / "model")},
           "data": {"blend": [{"path": str(tiny / "data/ja_sample_text_document")}], "seq_length": 32,
                    "num_workers": 0},
           "train": {"global_batch_size": 4, "micro_batch_size": 1, "max_steps": max_steps},
           "optim": {"lr": 1e-3, "min_lr": 1e-4}, "checkpoint": {"interval": interval},
           "eval": {"interval": 0, "at_start": False}, "logging": {"tensorboard": False}}
    path = run_dir.parent / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def train_records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["kind"] == "train"]


def world_size(record: dict) -> int:
    return round(record["tokens_per_s"] / record["tokens_per_s_per_device"])


def job_records(run_dir: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((run_dir / "jobs").glob("*.json"))}


def wait_until(predicate, timeout: float, what: str, interval: float = 0.2, on_timeout=lambda: ""):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{on_timeout()}")
        time.sleep(interval)


def logs(run_dir: Path) -> str:
    return "\n".join(f"== {p.name}\n{p.read_text(errors='replace')}" for p in sorted((run_dir / "logs").glob("*")))


def cli(*args, env: dict | None = None, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "keizoku", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=cwd, timeout=timeout)


def sharded_tokenize(tmp_path: Path, ja_texts: list[str], en_texts: list[str], profile: dict, tasks: int,
                     output: list[str], reference: dict) -> tuple[list[str], Path, list[str]]:
    """`keizoku submit tokenize --tasks N` of the sharded-run corpus (conftest.write_corpus) with this scheduler
    profile, and one local run over the same inputs for reference: (the job ids it printed, the inputs, the
    reference's dataset prefixes)."""
    from conftest import SAMPLE_TOKENIZER, write_corpus

    from keizoku.data.tokenize import TokenizeOptions, tokenize

    inputs = write_corpus(tmp_path / "in", ja_texts, en_texts)
    one = tokenize(TokenizeOptions([str(inputs)], str(SAMPLE_TOKENIZER), workers=1, **reference), progress=False,
                   log=lambda msg: None)
    prof = tmp_path / "tokenize-profile.yaml"
    prof.write_text(yaml.safe_dump(profile))
    proc = cli("submit", "tokenize", "--profile", prof, "--tasks", tasks, "--", inputs, "-t", SAMPLE_TOKENIZER,
               *output, "-j", "1", cwd=tmp_path)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
    return proc.stdout.split(), inputs, [d.prefix for d in one.datasets]


def same_dataset(a: str, b: str) -> bool:
    return all(Path(a + ext).read_bytes() == Path(b + ext).read_bytes() for ext in (".bin", ".idx"))
