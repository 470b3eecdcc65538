"""First contact and faults (issue 21, items 11-13), through the real CLI: a Gemma-2 model on the default attention,
exports of damaged checkpoints and of runs whose base model is gone, and ``inspect --decode`` from another
directory. Every failure is one ``error:`` line naming the file or key and what to do, exit 1, no traceback, and
nothing the user had is changed."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from conftest import EN_SAMPLE, SAMPLE_TOKENIZER, keizoku, tiny_llama_and_data


def run_all(*commands: tuple) -> list[subprocess.CompletedProcess]:
    """Several ``keizoku`` commands at once (each ``(cwd, *args)``): most of each one's time is its imports."""
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(lambda c: keizoku(*c[1:], cwd=c[0], check=False), commands))


def failed(proc: subprocess.CompletedProcess, *names: str, code: int = 1) -> str:
    """The one error line of a failed command, which names each of ``names``."""
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    for name in names:
        assert name in errors[0], (name, errors[0])
    return errors[0]


def snapshot(path: Path) -> dict:
    """Every file under ``path`` (or beside nothing: {}) and its bytes' digest."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()} if path.exists() else {}


def tiny_model(path: Path, config) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(SAMPLE_TOKENIZER / f, path / f)
    return path


SHAPE = {"vocab_size": 8002, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256, "bos_token_id": 8000,
         "eos_token_id": 8001}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """BASE/model: a tiny Llama with the bundled tokenizer; BASE/data: the English sample tokenized with it."""
    return tiny_llama_and_data(tmp_path_factory.mktemp("faults"), samples=(EN_SAMPLE,))


def train_config(run: Path, model: Path, steps: int, interval: int, data: Path) -> Path:
    cfg = {"run_dir": str(run), "model": {"hf_path": str(model)},
           "data": {"blend": [{"path": str(data / "en_sample_text_document"), "weight": 1.0}], "seq_length": 32,
                    "num_workers": 0},
           "train": {"global_batch_size": 2, "micro_batch_size": 2, "max_steps": steps},
           "checkpoint": {"interval": interval}, "eval": {"interval": 0},
           "logging": {"interval": 1, "tensorboard": False}}
    path = run.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(cfg))
    return path


# --- 11: attention ----------------------------------------------------------------------------------------------

def test_gemma2_trains_on_the_default_attention_and_sdpa_is_refused_naming_the_key(base, tmp_path):
    """Gemma-2 soft-caps its attention logits, which sdpa cannot: the default (auto) takes what transformers picks
    (eager); asking for sdpa names model.attn_implementation and the value to use."""
    from transformers import Gemma2Config

    model = tiny_model(tmp_path / "gemma2", Gemma2Config(**SHAPE, head_dim=16))
    ok, refused = run_all((None, "train", train_config(tmp_path / "run", model, 3, 0, base / "data")),
                          (None, "train", train_config(tmp_path / "sdpa", model, 3, 0, base / "data"),
                           "model.attn_implementation=sdpa"))
    assert ok.returncode == 0 and "Traceback" not in ok.stderr, ok.stderr
    losses = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in losses if r["kind"] == "train"] == [1, 2, 3]
    # refused before the run directory is made (keizoku.preflight): a config error
    line = failed(refused, "model.attn_implementation: 'sdpa'", "Gemma2ForCausalLM", "auto", "eager", code=2)
    assert "model.hf_path" not in line and not (tmp_path / "sdpa").exists()


# --- 12: export -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(base) -> Path:
    """A tiny Llama run with complete checkpoints at steps 1 and 2, whose model.hf_path is deleted afterwards."""
    model = shutil.copytree(base / "model", base / "model-gone")
    keizoku("train", train_config(base / "run", model, 2, 1, base / "data"))
    shutil.rmtree(model)
    return base / "run"


def damage(run: Path, fault: str) -> Path:
    """The file of the newest checkpoint that ``fault`` damages (done here): its .metadata, or the shard file
    holding the first model tensor's item."""
    from keizoku.engines.torch.checkpoint_reader import read_metadata

    ckpt = run / "checkpoints/step_00000002"
    metadata = ckpt / ".metadata"
    info = min((i for k, i in read_metadata(ckpt).storage_data.items() if k.fqn.startswith("model.")),
               key=lambda i: (i.relative_path, i.offset))
    shard = ckpt / info.relative_path
    if fault == "truncated shard":
        with open(shard, "r+b") as f:
            f.truncate(info.offset + 1000)
        return shard
    if fault == "deleted shard":
        shard.unlink()
        return shard
    if fault == "deleted metadata":
        metadata.unlink()
        return metadata
    if fault == "corrupt metadata":
        data = bytearray(metadata.read_bytes())
        data[100:200] = b"\0" * 100
        metadata.write_bytes(bytes(data))
        return metadata
    if fault == "corrupt shard":  # the zip archive (torch.save) of the first model tensor
        data = bytearray(shard.read_bytes())
        end = info.offset + info.length  # its central directory, which torch.load reads first
        data[end - 64:end] = b"\xff" * 64
        shard.write_bytes(bytes(data))
        return shard
    raise ValueError(fault)


FAULTS = ["truncated shard", "deleted metadata", "corrupt shard"]  # damage() also: deleted shard, corrupt metadata


@pytest.fixture(scope="module")
def exports(trained, tmp_path_factory) -> dict:
    """Every export case, run at once: the run as it is (its model.hf_path deleted), each fault on a copy of the run
    (some over an earlier export with --overwrite, which must survive), and a copy without its base-model/."""
    base = tmp_path_factory.mktemp("exports")
    cases, commands = {}, []
    commands.append((None, "export", trained, "--out", base / "ok"))
    for i, fault in enumerate(FAULTS):
        run = base / f"run{i}"
        shutil.copytree(trained, run)
        out = base / f"out{i}"
        if fault != "truncated shard":  # an earlier export is there: --overwrite replaces it only with a whole one
            out.mkdir()
            (out / "keizoku_export.json").write_text('{"step": 1}\n')
            (out / "model.safetensors").write_bytes(b"earlier")
        cases[fault] = (run, damage(run, fault), out, snapshot(out))
        commands.append((None, "export", run, "--out", out, "--overwrite"))
    gone = base / "no-base-model"
    shutil.copytree(trained, gone)
    shutil.rmtree(gone / "base-model")
    commands.append((None, "export", gone, "--out", base / "out-gone"))
    results = run_all(*commands)
    return {"ok": (results[0], base / "ok"), "gone": (results[-1], gone, base / "out-gone"),
            **{fault: (*cases[fault], results[1 + i]) for i, fault in enumerate(FAULTS)}}


def test_export_of_an_incomplete_checkpoint_names_it_and_the_complete_ones(trained, tmp_path):
    run = shutil.copytree(trained, tmp_path / "run")
    (run / "checkpoints/step_00000002/keizoku-commit.json").unlink()  # as a save killed before its commit
    proc = keizoku("export", run, "--out", tmp_path / "out", "--step", "2", check=False)
    failed(proc, str(run / "checkpoints/step_00000002"), "incomplete", "keizoku-commit.json", "--step", "step 1")
    assert not (tmp_path / "out").exists()


def test_export_needs_no_model_hf_path(exports, trained):
    proc, out = exports["ok"]
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert not Path(yaml.safe_load((trained / "config.yaml").read_text())["model"]["hf_path"]).exists()
    assert json.loads((out / "keizoku_export.json").read_text())["step"] == 2
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()


@pytest.mark.parametrize("fault", FAULTS)
def test_export_of_a_damaged_checkpoint_names_the_file_and_an_earlier_step(exports, fault):
    _, file, out, before, proc = exports[fault]
    failed(proc, str(file), "checkpoint step 2 is damaged", "--step 1")
    assert snapshot(out) == before  # nothing at --out, or the earlier export as it was
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(".tmp")]  # no staging debris


def test_export_without_the_base_model_names_the_key_and_config(exports):
    proc, run, out = exports["gone"]
    failed(proc, "model.hf_path", str(run / "config.yaml"), str(run / "base-model"))
    assert not out.exists()


# --- 13: inspect --decode -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenized(tmp_path_factory) -> Path:
    """WORK/a/out: tokenized with ``-t ./tok`` typed in WORK/a (tok beside out); WORK/a/inside: with the tokenizer
    inside the output directory; WORK/b: another directory."""
    work = tmp_path_factory.mktemp("inspect")
    a = work / "a"
    (a / "inside").mkdir(parents=True)
    (work / "b").mkdir()
    shutil.copytree(SAMPLE_TOKENIZER, a / "tok")
    shutil.copytree(SAMPLE_TOKENIZER, a / "inside/tok")
    (a / "docs.jsonl").write_text('{"text": "hello world"}\n{"text": "second document"}\n')
    for proc in run_all((a, "tokenize", "docs.jsonl", "-t", "./tok", "-o", "out", "-q"),
                        (a, "tokenize", "docs.jsonl", "-t", "inside/tok", "-o", "inside", "-q")):
        assert proc.returncode == 0, proc.stderr
    return work


def recorded(manifest: Path) -> str:
    return json.loads(manifest.read_text())["datasets"]["docs_text_document"]["tokenizer"]["name_or_path"]


def test_manifest_stores_the_tokenizer_resolved_and_inspect_decodes_from_elsewhere(tokenized):
    a, b = tokenized / "a", tokenized / "b"
    assert recorded(a / "out/keizoku-manifest.json") == str(a / "tok")  # absolute, not "./tok"
    assert recorded(a / "inside/keizoku-manifest.json") == "./tok"  # beside the datasets: moves with them
    moved = tokenized / "moved"
    shutil.copytree(a / "inside", moved)
    old = tokenized / "old"  # a manifest of an earlier release: the path as typed, relative to the manifest here
    shutil.copytree(a / "inside", old)
    data = json.loads((old / "keizoku-manifest.json").read_text())
    data["datasets"]["docs_text_document"]["tokenizer"]["name_or_path"] = "tok"
    (old / "keizoku-manifest.json").write_text(json.dumps(data))
    for proc in run_all((b, "inspect", "../a/out", "--decode", "1"), (b, "inspect", moved, "--decode", "1"),
                        (b, "inspect", old, "--decode", "1")):
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
        assert "hello world" in proc.stdout


def test_old_manifest_with_a_tokenizer_path_found_nowhere_names_the_manifest_and_key(tokenized):
    lost = tokenized / "lost"
    shutil.copytree(tokenized / "a/out", lost)
    manifest = lost / "keizoku-manifest.json"
    data = json.loads(manifest.read_text())
    data["datasets"]["docs_text_document"]["tokenizer"]["name_or_path"] = "./tok"  # as typed in a directory unknown
    manifest.write_text(json.dumps(data))
    before = snapshot(lost)
    proc = keizoku("inspect", lost, "--decode", "1", cwd=tokenized / "b", check=False)
    failed(proc, str(manifest), "datasets.docs_text_document.tokenizer.name_or_path", "--tokenizer")
    assert snapshot(lost) == before
