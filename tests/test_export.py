"""`keizoku export` (engine torch), streamed: what save_pretrained writes, in the base model's dtype or another,
every tensor and the logits verified before publishing; and the run's copy of its base model (``keizoku.base_model``)
that exports a run after ``model.hf_path`` is gone.

Runs made here by hand (``checkpointed_run``: a model's weights in one DCP checkpoint laid out as engine torch saves
it) test the export itself, in process; runs trained through the real CLI test it on real checkpoints."""

from __future__ import annotations

import copy
import filecmp
import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import SAMPLE_TOKENIZER, keizoku, tiny_llama_and_data
from test_train import config, final_weights

from keizoku import base_model, rundir
from keizoku.config import load_config, save_resolved
from keizoku.engines import ExportError
from keizoku.engines.torch import export as torch_export
from keizoku.engines.torch.checkpoint import TRAINER_STATE

SHAPE = dict(vocab_size=8002, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, bos_token_id=8000, eos_token_id=8001)
STEP = 5


def tiny_model(kind: str):
    from transformers import AutoModelForCausalLM, LlamaConfig, MixtralConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mixtral": MixtralConfig}[kind]
    extra = {"num_local_experts": 4, "num_experts_per_tok": 2} if kind == "mixtral" else {}
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cls(**SHAPE, tie_word_embeddings=kind == "qwen2", **extra))


def checkpointed_run(base: Path, model, base_dtype: torch.dtype = torch.float32) -> Path:
    """BASE/model: ``model`` saved in ``base_dtype`` with the bundled tokenizer; BASE/run: a run of it whose one
    checkpoint holds ``model``'s fp32 weights as engine torch saves them (DCP model + optim, trainer state, commit)."""
    import torch.distributed.checkpoint as dcp

    run = base / "run"
    final = rundir.checkpoint_path(run, STEP)
    staged = rundir.staging_path(final, tag="")
    dcp.save({"model": model.state_dict(), "optim": {}}, checkpoint_id=str(staged), no_dist=True)
    (staged / TRAINER_STATE).write_text(json.dumps({"step": STEP, "consumed_samples": 40, "consumed_tokens": 2560}))
    rundir.commit_checkpoint(staged, final, STEP)
    copy.deepcopy(model).to(base_dtype).save_pretrained(base / "model")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(SAMPLE_TOKENIZER / name, base / "model" / name)
    save_resolved(load_config(None, [f"run_dir={run}", f"model.hf_path={base / 'model'}", "data.mock=true",
                                     f"train.max_steps={STEP}"]), run)
    return run


def safetensors_of(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for f in sorted(directory.glob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mixtral"])
def test_export_writes_what_save_pretrained_writes(kind, tmp_path, monkeypatch):
    """Several shard files and their index, a tied output layer left out (qwen2), transformers 5's per-expert
    tensors (mixtral): file for file what save_pretrained writes of the same weights (mixtral: the same tensors;
    transformers splits its files by the storage the expert views share)."""
    model = tiny_model(kind)
    run = checkpointed_run(tmp_path, model)
    monkeypatch.setattr(torch_export, "MAX_SHARD_BYTES", 100_000)
    monkeypatch.setattr(torch_export, "SLICE_BYTES", 4096)  # tensors written in many slices, by several threads
    logged = []
    info = torch_export.export(run, tmp_path / "hf", log=logged.append)
    model.save_pretrained(tmp_path / "reference", max_shard_size=100_000)

    assert info["step"] == STEP and info["dtype"] == "float32" and info["max_logit_diff"] <= 1e-5
    assert json.loads((tmp_path / "hf" / rundir.EXPORT_RECORD).read_text()) == info
    assert any(m.startswith("verified: every exported tensor equals the checkpoint's") for m in logged)
    assert (tmp_path / "hf/model.safetensors.index.json").is_file()
    written = sorted(p.name for p in (tmp_path / "reference").iterdir())
    if kind == "mixtral":
        exported, expected = safetensors_of(tmp_path / "hf"), safetensors_of(tmp_path / "reference")
        assert exported.keys() == expected.keys()
        assert all(torch.equal(exported[k], expected[k]) for k in expected)
        written = ["config.json", "generation_config.json"]
    for name in written:
        assert filecmp.cmp(tmp_path / "reference" / name, tmp_path / "hf" / name, shallow=False), name
    if kind == "qwen2":
        assert "lm_head.weight" not in safetensors_of(tmp_path / "hf")


def test_export_in_the_base_dtype_or_another(tmp_path):
    """A bf16 base model exports its fp32 checkpoint rounded to bf16 (half the bytes; the logits of the checkpoint
    rounded so); --dtype fp32 keeps the checkpoint's values exactly."""
    model = tiny_model("llama")
    run = checkpointed_run(tmp_path, model, base_dtype=torch.bfloat16)
    trained = model.state_dict()
    for dtype, out in (("auto", tmp_path / "bf16"), ("fp32", tmp_path / "fp32")):
        info = torch_export.export(run, out, dtype=dtype, log=lambda m: None)
        exported = safetensors_of(out)
        want = torch.bfloat16 if dtype == "auto" else torch.float32
        assert info["dtype"] == str(want).removeprefix("torch.") and info["max_logit_diff"] <= 1e-5
        assert json.loads((out / "config.json").read_text())["dtype"] == info["dtype"]
        assert exported.keys() == trained.keys()
        for k, v in exported.items():
            assert v.dtype == want and torch.equal(v, trained[k].to(want)), k
    assert (tmp_path / "bf16/model.safetensors").stat().st_size < 0.51 * (tmp_path / "fp32/model.safetensors").stat().st_size


def test_verification_refuses_a_wrong_export_and_publishes_nothing(tmp_path, monkeypatch):
    """A tensor written wrong is found by the tensor comparison; with that comparison skipped, by the logits."""
    run = checkpointed_run(tmp_path, tiny_model("llama"))
    write = torch_export.SafetensorsWriter.write

    def corrupted(self, name, offset, data):
        write(self, name, offset, data * 2 if name == "model.layers.1.mlp.up_proj.weight" else data)

    monkeypatch.setattr(torch_export.SafetensorsWriter, "write", corrupted)
    with pytest.raises(ExportError, match="model.layers.1.mlp.up_proj.weight differs from the checkpoint's"):
        torch_export.export(run, tmp_path / "hf", log=lambda m: None)
    monkeypatch.setattr(torch_export, "read_header", lambda path, plan: {})  # no tensor read back
    with pytest.raises(ExportError, match="logits differ from the checkpoint's"):
        torch_export.export(run, tmp_path / "hf", log=lambda m: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "run"]  # nothing published, no staging left


@pytest.mark.parametrize("direct", [True, False])
def test_checkpoint_reader_reads_any_slice_of_a_dcp_checkpoint(tmp_path, monkeypatch, direct):
    """Every tensor of a DCP checkpoint (several dtypes, a view saved, 1-D, integer), read in small slices, equals
    what was saved: read from its place in the file (direct), or, where an item cannot be, with torch.load."""
    import torch.distributed.checkpoint as dcp

    from keizoku.engines.torch import checkpoint_reader

    if not direct:
        monkeypatch.setattr(checkpoint_reader, "_locate_storage", lambda *args: None)
    saved = {"a": torch.randn(100, 33), "b": torch.randn(7).to(torch.bfloat16), "c": torch.randn(10, 20)[:, :5],
             "d": torch.arange(12).reshape(3, 4)}
    dcp.save({"model": saved}, checkpoint_id=str(tmp_path), no_dist=True)
    reader = checkpoint_reader.CheckpointReader(tmp_path)
    for name, tensor in saved.items():
        parts = reader.slices(f"model.{name}", 256)
        assert all((p.data_start is not None) == direct for p in parts)
        assert len(parts) == (52 if name == "a" and direct else 1)
        assert [p.start for p in parts] == [sum(q.numel for q in parts[:i]) for i in range(len(parts))]
        assert torch.equal(torch.cat([p.read() for p in parts]), tensor.reshape(-1)), name


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_llama_and_data(tmp_path_factory.mktemp("export"))


@pytest.mark.parametrize("kind", ["qwen2"])  # llama: the trained-run exports of test_train.py
def test_a_trained_run_exports_after_its_base_model_is_gone(kind, setup, tmp_path):
    """The trainer copies the base model's config and tokenizer into the run; with model.hf_path moved away, the
    export is verified (tensors, logits), is what save_pretrained writes of the checkpoint's weights (qwen2: tied
    output layer), and takes --dtype and --no-verify-logits."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    base = tmp_path / "base"
    shutil.copytree(setup / "model", base)
    if kind == "qwen2":
        tiny_model("qwen2").save_pretrained(base)  # beside the Llama's tokenizer
    run = tmp_path / "run"
    keizoku("train", config(setup, run, train__max_steps=2, checkpoint__interval=0, eval__interval=0),
            f"model.hf_path={base}", "eval.at_start=false")
    assert json.loads((run / "base-model" / base_model.RECORD).read_text())["model"] == str(base)
    base.rename(tmp_path / "moved")

    out = keizoku("export", run, "--out", tmp_path / "hf").stderr
    assert "verified: every exported tensor equals the checkpoint's in float32" in out
    assert "verified: the export reproduces the checkpoint's logits" in out
    trained = final_weights(run, 2)
    reference = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tmp_path / "moved"))
    reference.load_state_dict({k: v for k, v in trained.items() if k in reference.state_dict()}, strict=False)
    reference.save_pretrained(tmp_path / "reference")
    assert filecmp.cmp(tmp_path / "reference/model.safetensors", tmp_path / "hf/model.safetensors", shallow=False)
    assert AutoTokenizer.from_pretrained(tmp_path / "hf")("テスト").input_ids[0] == 8000

    out = keizoku("export", run, "--out", tmp_path / "hf-bf16", "--dtype", "bf16", "--no-verify-logits").stderr
    assert "verified: every exported tensor equals the checkpoint's in bfloat16" in out and "logits" not in out
    assert json.loads((tmp_path / "hf-bf16/config.json").read_text())["dtype"] == "bfloat16"


# --- the run's copy of its base model ---------------------------------------------------------------------------

def run_config(tmp_path: Path, hf_path, tokenizer=None, trust_remote_code=False):
    overrides = [f"run_dir={tmp_path / 'run'}", f"model.hf_path={hf_path}", "data.mock=true", "train.max_steps=1",
                 f"model.trust_remote_code={str(trust_remote_code).lower()}"]
    return load_config(None, overrides + ([f"model.tokenizer={tokenizer}"] if tokenizer else []))


def test_snapshot_copies_the_small_files_once(tmp_path):
    model_dir = tmp_path / "model"
    tiny_model("llama").save_pretrained(model_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(SAMPLE_TOKENIZER / name, model_dir / name)
    (model_dir / "README.md").write_text("a model card\n")
    (model_dir / "modeling_custom.py").write_text("# the model's own code\n")
    cfg = run_config(tmp_path, model_dir, trust_remote_code=True)
    assert base_model.model_dir(cfg) == str(model_dir) and base_model.tokenizer_dir(cfg) == str(model_dir)

    snap = base_model.snapshot(cfg)
    assert snap == rundir.RunDir(cfg.run_dir).base_model
    assert sorted(str(p.relative_to(snap)) for p in snap.rglob("*")) == sorted([
        "config.json", "generation_config.json", "modeling_custom.py", base_model.RECORD, "tokenizer",
        "tokenizer/config.json", "tokenizer/modeling_custom.py", "tokenizer/tokenizer.json",
        "tokenizer/tokenizer_config.json"])  # never the weights, nor what transformers does not read
    for name in ("config.json", "tokenizer/tokenizer.json"):
        assert (snap / name).read_bytes() == (model_dir / name.removeprefix("tokenizer/")).read_bytes()
    record = json.loads((snap / base_model.RECORD).read_text())
    assert record["model"] == str(model_dir) and record["model_from"] == str(model_dir.absolute())
    import hashlib
    assert record["config_sha256"] == hashlib.sha256((model_dir / "config.json").read_bytes()).hexdigest()
    assert base_model.model_dir(cfg) == str(snap) and base_model.tokenizer_dir(cfg) == str(snap / "tokenizer")

    stamp = (snap / base_model.RECORD).stat().st_mtime_ns
    assert base_model.snapshot(cfg) == snap and (snap / base_model.RECORD).stat().st_mtime_ns == stamp  # left as is
    shutil.rmtree(model_dir)
    assert base_model.snapshot(cfg) == snap  # the base model gone: the copy serves
    tiny_model("qwen2").save_pretrained(model_dir)  # another model at that path
    with pytest.raises(base_model.BaseModelError, match="model.hf_path: .* is not the one the run copied"):
        base_model.snapshot(cfg)


def test_snapshot_errors_name_the_setting(tmp_path, monkeypatch):
    with pytest.raises(base_model.BaseModelError, match=f"model.hf_path: {tmp_path}/missing: no such directory"):
        base_model.snapshot(run_config(tmp_path, tmp_path / "missing"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(base_model.BaseModelError, match="model.hf_path: 'keizoku-test/no-such-model' is neither"):
        base_model.snapshot(run_config(tmp_path, "keizoku-test/no-such-model"))
    model_dir = tmp_path / "model"
    tiny_model("llama").save_pretrained(model_dir)
    with pytest.raises(base_model.BaseModelError, match="model.tokenizer: .*missing-tokenizer: no such directory"):
        base_model.snapshot(run_config(tmp_path, model_dir, tokenizer=tmp_path / "missing-tokenizer"))
    with pytest.raises(base_model.BaseModelError, match="model.hf_path: cannot load the tokenizer"):
        base_model.snapshot(run_config(tmp_path, model_dir))  # no tokenizer there, none named
    assert not rundir.RunDir(tmp_path / "run").base_model.exists()
    assert not any(p.name.startswith(".tmp") for p in (tmp_path / "run").iterdir())


def test_export_replaces_nothing_of_the_users(tmp_path):
    """`keizoku export --out` (issue 21.1): a directory holding other files, the current directory and the run's
    checkpoints are refused with one line and left as they were; an earlier export is replaced only with
    --overwrite; an empty directory is used."""
    run = checkpointed_run(tmp_path, tiny_model("llama"))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes\n")
    cases = [(["--out", mine], "exists and holds files that are not a keizoku export", None),
             (["--out", "."], "is the current directory", tmp_path),
             (["--out", run / "checkpoints/step_00000005/hf"], "is inside the run's checkpoints", None),
             (["--out", run], "is or holds the run directory", None)]
    for args, message, cwd in cases:
        proc = keizoku("export", run, *args, "--no-verify-logits", check=False, cwd=cwd)
        assert proc.returncode == 1 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and (mine / "notes.txt").read_text() == "my notes\n"
    assert not (run / "checkpoints/step_00000005/hf").exists()

    empty = tmp_path / "empty"
    empty.mkdir()
    keizoku("export", run, "--out", empty, "--no-verify-logits")
    proc = keizoku("export", run, "--out", empty, "--no-verify-logits", check=False)
    assert proc.returncode == 1 and "holds an earlier keizoku export; add --overwrite" in proc.stderr
    before = (empty / rundir.EXPORT_RECORD).stat().st_mtime_ns
    keizoku("export", run, "--out", empty, "--no-verify-logits", "--overwrite")
    assert (empty / rundir.EXPORT_RECORD).stat().st_mtime_ns != before
    import os
    umask = os.umask(0o022)
    os.umask(umask)
    for path in [empty, *empty.iterdir()]:  # the user's umask, as for any file (issue 21.18: they were 0600)
        assert path.stat().st_mode & 0o777 == (0o777 if path.is_dir() else 0o666) & ~umask, path
