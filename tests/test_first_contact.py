"""Mistakes a new user makes and faults a run meets, through the real CLI: each ends with one line naming the key or
file at fault, a documented exit code (rundir.ExitCode), no traceback, and nothing of the user's changed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import JA_SAMPLE, SAMPLE_TOKENIZER, keizoku, tiny_llama_and_data


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_llama_and_data(tmp_path_factory.mktemp("first-contact"))


def config(setup: Path, run_dir: Path, *, model: Path | None = None, data: str | None = None, **sections) -> Path:
    data = data or str(setup / "data/ja_sample_text_document")
    cfg = {"run_dir": str(run_dir), "model": {"hf_path": str(model or setup / "model")},
           "data": {"blend": [{"path": data}], "validation": {"ja": [{"path": data}]}, "seq_length": 32,
                    "num_workers": 0},
           "train": {"global_batch_size": 2, "micro_batch_size": 2, "max_steps": 2},
           "checkpoint": {"interval": 0}, "eval": {"interval": 0, "batches": 1},
           "logging": {"interval": 1, "tensorboard": False}}
    for section, values in sections.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    path = run_dir.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(cfg))
    return path


def files_of(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def refused(proc, code: int, *phrases: str) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    for phrase in phrases:
        assert phrase in proc.stderr, (phrase, proc.stderr)


def small_model(setup: Path, dest: Path, **shape) -> Path:
    """The setup's model with other config fields (``shape``), random weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.from_pretrained(setup / "model")
    for key, value in shape.items():
        setattr(cfg, key, value)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(dest)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(setup / "model" / f, dest / f)
    return dest


# --- 21.9: every path is checked before the run directory is made ----------------------------------------------

def test_bad_paths_are_named_before_anything_is_written(setup, tmp_path):
    missing_model = tmp_path / "no-such-model"
    cases = [
        (dict(model=missing_model), "model.hf_path: " + str(missing_model) + ": no such directory"),
        (dict(data=str(tmp_path / "nowhere/ja_text_document")), "data.blend[0].path: no dataset "),
        (dict(data=str(tmp_path / "empty-dir")), "data.blend[0].path: " + str(tmp_path / "empty-dir")
         + " is a directory without a keizoku-manifest.json"),
    ]
    (tmp_path / "empty-dir").mkdir()
    for i, (kw, message) in enumerate(cases):
        run = tmp_path / f"run{i}"
        cfg = config(setup, run, **kw)
        refused(keizoku("train", cfg, check=False), 2, message)
        assert not run.exists()  # no half-made run directory
        refused(keizoku("config", "check", cfg, check=False), 1, message)
    # a .bin without its .idx: both files named; a run that exists keeps every byte
    prefix = tmp_path / "half/ja_text_document"
    prefix.parent.mkdir()
    shutil.copy(setup / "data/ja_sample_text_document.bin", prefix.with_suffix(".bin"))
    run = tmp_path / "existing"
    run.mkdir()
    (run / "config.yaml").write_text("# the user's\n")
    before = files_of(run)
    refused(keizoku("train", config(setup, run, data=str(prefix)), check=False), 2,
            f"data.blend[0].path: no dataset {prefix} ({prefix}.idx not found")
    assert files_of(run) == before
    # a directory that is no HF model: named before any weight is read
    refused(keizoku("train", config(setup, tmp_path / "r", model=tmp_path / "empty-dir"), check=False), 2,
            f"model.hf_path: {tmp_path / 'empty-dir'} has no config.json")


# --- 21.2: data tokenized for another vocabulary -------------------------------------------------------------

def test_data_of_a_larger_vocabulary_is_refused_before_loading(setup, tmp_path):
    model = small_model(setup, tmp_path / "small-vocab", vocab_size=4000, bos_token_id=1, eos_token_id=2)
    run = tmp_path / "run"
    proc = keizoku("train", config(setup, run, model=model), check=False)
    refused(proc, 2, "data.blend[0].path: ", "was tokenized with", "more than the model's embedding has rows (4,000)",
            "data.validation.ja[0].path: ")
    assert not run.exists()
    # the same data without its manifest (as Megatron-LM's tools write it): the first batch past the embedding
    bare = tmp_path / "bare"
    bare.mkdir()
    for suffix in (".bin", ".idx"):
        shutil.copy(setup / f"data/ja_sample_text_document{suffix}", bare / f"ja{suffix}")
    proc = keizoku("train", config(setup, tmp_path / "run2", model=model, data=str(bare / "ja")), check=False)
    refused(proc, 1, "data.validation.ja: a sample: holds token id ", "past the model's embedding (4000 rows)")
    proc = keizoku("train", config(setup, tmp_path / "run3", model=model, data=str(bare / "ja")), "eval.at_start=false",
                   check=False)
    refused(proc, 1, "data.blend: a sample of step 1: holds token id ", "past the model's embedding (4000 rows)")


def test_data_of_another_tokenizer_is_refused_unless_allowed(setup, tmp_path):
    other = tmp_path / "other-tokenizer"
    shutil.copytree(SAMPLE_TOKENIZER, other)
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = list(vocab)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # same size, other ids
    (other / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
    data = tmp_path / "data"
    keizoku("tokenize", JA_SAMPLE, "-t", other, "-o", data, "-q")
    prefix = str(next(data.glob("*.idx")).with_suffix(""))
    run = tmp_path / "run"
    refused(keizoku("train", config(setup, run, data=prefix), check=False), 2,
            f"data.blend[0].path: {prefix} was tokenized with", "not with the run's tokenizer",
            "data.require_run_tokenizer=false")
    assert not run.exists()
    keizoku("train", config(setup, run, data=prefix), "data.require_run_tokenizer=false")
    assert (run / "metrics.jsonl").exists()



# --- 21.4 and 21.8: Ctrl-C saves; a second aborts; a stop at the last step, or a kill after it, still finishes ------

def start(cfg: Path, *args: str, hook: str | None = None) -> subprocess.Popen:
    env = {**os.environ, **({"KEIZOKU_TEST_CHECKPOINT_HOOK": hook} if hook else {})}
    return subprocess.Popen([sys.executable, "-m", "keizoku", "train", str(cfg), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"training ended before {path} appeared:\n{proc.communicate()}"
        assert time.time() < deadline, f"timed out waiting for {path}"
        time.sleep(0.05)


def evals(run: Path) -> list[int]:
    return [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "eval"]


def test_ctrl_c_saves_then_stops_and_a_second_aborts(setup, tmp_path):
    # the save of step 1 pauses (test hook) while the signals arrive: step 2 is the one that hears them
    run = tmp_path / "once"
    cfg = config(setup, run, train={"max_steps": 4}, checkpoint={"interval": 1, "keep_last": 4})
    proc = start(cfg, hook="1:staging:sleep=3")
    wait_for(run / "checkpoints/.tmp.step_00000001", proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, (out, err)
    assert "Ctrl-C: saving at the end of this step" in err and "Ctrl-C: saved step 2; run again to continue" in out
    assert "Traceback" not in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000001", "step_00000002"]
    # (resuming from it: tests/test_train.py::test_sigterm_saves_and_exits_resumable)

    run = tmp_path / "twice"
    cfg = config(setup, run, train={"max_steps": 4}, checkpoint={"interval": 1})
    proc = start(cfg, hook="1:staging:sleep=5")
    wait_for(run / "checkpoints/.tmp.step_00000001", proc)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (out, err)
    assert "aborted by a second Ctrl-C" in err and "Traceback" not in err
    assert not list((run / "checkpoints").glob("step_*"))  # nothing that looks complete


def test_a_stop_at_the_last_step_finishes_and_a_rerun_completes_a_missing_final_evaluation(setup, tmp_path):
    run = tmp_path / "run"
    cfg = config(setup, run, train={"max_steps": 2}, checkpoint={"interval": 1})
    proc = start(cfg, hook="1:staging:sleep=3")
    wait_for(run / "checkpoints/.tmp.step_00000001", proc)
    proc.send_signal(signal.SIGTERM)  # heard in step 2, the last: the run is done, not stopped
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, (out, err)
    assert (run / "checkpoints/step_00000002").is_dir() and evals(run)[-1] == 2
    # a kill after the final save, before the final evaluation was logged: the rerun evaluates, then exits 0
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("".join(f"{line}\n" for line in lines
                                               if not (json.loads(line)["kind"] == "eval" and json.loads(line)["step"] == 2)))
    out = keizoku("train", cfg).stdout
    assert "its final evaluation is missing: evaluating" in out and evals(run).count(2) == 1


# --- 21.6: a run that has trained keeps its definition unless a change is explicit; every start is recorded ----------

def test_changes_to_a_trained_run_are_refused_unless_explicit_and_recorded(setup, tmp_path):
    run = tmp_path / "run"
    cfg = config(setup, run)
    proc = keizoku("train", cfg)
    # 21.16: the first lines say where the run goes; the libraries' harmless start-up warnings are hidden
    assert proc.stdout.startswith(f"keizoku: run directory {run} (config.yaml, config-history.jsonl)\n"), proc.stdout
    assert f"keizoku: metrics {run}/metrics.jsonl; checkpoints {run}/checkpoints (at the end" in proc.stdout
    assert "UserWarning" not in proc.stderr and "Failed to load" not in proc.stderr, proc.stderr
    before = files_of(run / "checkpoints") | {"config.yaml": (run / "config.yaml").read_bytes()}
    proc = keizoku("train", cfg, "train.max_steps=4", "optim.lr=0.001", check=False)
    refused(proc, 2, f"{run / 'config.yaml'}: this run has trained, and this start changes what it trains: "
            "optim.lr 0.0003 → 0.001, train.max_steps 2 → 4 (another length reshapes the LR schedule",
            "add --allow-changes")
    assert files_of(run / "checkpoints") | {"config.yaml": (run / "config.yaml").read_bytes()} == before
    free = keizoku("train", cfg, "logging.interval=5", "eval.batches=2", "--verbose")  # how it runs: free to change
    assert "training is complete" in free.stdout and "UserWarning: Transformer Engine" in free.stderr  # --verbose
    keizoku("train", cfg, "train.max_steps=4", "--allow-changes")
    assert (run / "checkpoints/step_00000004").is_dir()
    history = [json.loads(line) for line in (run / "config-history.jsonl").read_text().splitlines()]
    assert [h["first"] for h in history] == [True, False, False]
    assert history[1]["changes"] == {} and history[1]["argv"][-3:] == ["logging.interval=5", "eval.batches=2",
                                                                       "--verbose"]
    assert history[2]["changes"] == {"train.max_steps": [2, 4]} and history[2]["allowed"]
    assert "--allow-changes" in history[2]["argv"]
