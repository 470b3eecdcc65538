"""The config system: defaults, YAML, overrides, validation that names the key."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import ROOT, keizoku
from keizoku.config import ConfigError, KeizokuConfig, defaults_yaml, load_config, save_resolved, validate

VALID = ["model.hf_path=some/model", "data.mock=true", "train.max_steps=10"]


def test_defaults_yaml_reads_back_as_the_defaults(tmp_path):
    text = defaults_yaml()
    assert text.count("#") > 40  # every setting carries its help
    merged = OmegaConf.merge(OmegaConf.structured(KeizokuConfig), OmegaConf.create(text))
    assert OmegaConf.to_object(merged) == KeizokuConfig()
    path = tmp_path / "defaults.yaml"
    path.write_text(text)
    cfg = load_config(path, VALID)
    assert cfg.model.hf_path == "some/model" and cfg.data.seq_length == 4096


def test_swallow_example(tmp_path):
    cfg = load_config(ROOT / "examples/llama31_8b_cpt.yaml")
    assert (cfg.data.seq_length, cfg.train.global_batch_size, cfg.optim.lr, cfg.optim.min_lr) == (8192, 1024, 2.5e-5, 2.5e-6)
    assert (cfg.schedule.kind, cfg.schedule.warmup_steps, cfg.optim.betas, cfg.optim.eps) == ("cosine", 1000, (0.9, 0.95), 1e-8)
    assert (cfg.optim.weight_decay, cfg.optim.grad_clip, cfg.model.dtype) == (0.1, 1.0, "bf16")
    assert [e.weight for e in cfg.data.blend] == [0.9, 0.1] and sorted(cfg.data.validation) == ["en", "ja"]
    saved = save_resolved(cfg, tmp_path / "run")
    assert load_config(saved) == cfg


def test_precedence_cli_over_yaml_over_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {hf_path: a}\ndata: {mock: true, seq_length: 128}\ntrain: {max_steps: 5}\n")
    cfg = load_config(path, ["data.seq_length=256", "optim.betas=[0.8,0.9]"])
    assert cfg.data.seq_length == 256 and cfg.optim.betas == (0.8, 0.9)
    assert cfg.train.max_steps == 5 and cfg.optim.lr == KeizokuConfig().optim.lr


@pytest.mark.parametrize("overrides,message", [
    (["train.global_batch=4"], "override train.global_batch=4: train.global_batch: not a setting; did you mean "
                               "train.global_batch_size?"),
    (["data.seq_length=long"], "data.seq_length: Value 'long'"),
    (["schedule.kind=linear"], "schedule.kind: Invalid value 'linear'"),
    (["train.global_batch_size=10", "train.micro_batch_size=4"],
     "train.global_batch_size: 10 is not divisible by train.micro_batch_size = 4"),
    (["data.mock=false"], "data.blend: no training data given"),
    (["model.hf_path=null"], "model.hf_path: required"),
    (["train.max_tokens=1000"], "train.max_steps / train.max_tokens: give exactly one"),
    (["optim.min_lr=1.0"], "optim.min_lr: must be between 0 and optim.lr"),
    (["optim.state_dtype=fp16"], "optim.state_dtype: Invalid value 'fp16'"),
    (["logging.profile_step=-1"], "logging.profile_step: must be >= 0 (0: off), not -1"),
    (["logging.profile_step=3", "logging.profile_ranks=[0,-1]"], "logging.profile_ranks: [-1] negative"),
    (["model.activation_checkpointing=full", "model.full_recompute_layers=2"],
     "model.full_recompute_layers: every layer already recomputes fully"),
    (["schedule.warmup_steps=20"], "schedule.warmup_steps: 20 is more than train.max_steps (10)"),
    (["data.mock=false", "data.blend=[{path: a, weight: 1}, {path: b, tokens: 100}]"],
     "data.blend: mixes weights and token budgets"),
    (["data.validation={ja: [{path: v, tokens: 5}]}"], "data.validation.ja[0].tokens: token budgets apply to data.blend"),
    (["checkpoint.resume=/no/such/checkpoint"], "checkpoint.resume: '/no/such/checkpoint' is neither"),
    (["train.max_steps"], "override 'train.max_steps': expected key.path=value"),
    (["engine=megatron", "parallel.grad_accumulation=sharded"],
     "parallel.reshard_after_forward / grad_accumulation / reduce_dtype: engine: torch only"),
])
def test_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, VALID + overrides)
    assert message in str(e.value)


def test_data_parallel_divisibility():
    cfg = load_config(None, VALID + ["train.global_batch_size=8", "train.micro_batch_size=2"])
    assert validate(cfg, world_size=2) == []
    assert validate(cfg, world_size=3) == [
        "train.global_batch_size: 8 is not divisible by train.micro_batch_size × data-parallel size = 2 × 3"]


def test_profile_ranks_exist():
    cfg = load_config(None, VALID + ["train.global_batch_size=8", "logging.profile_step=2", "logging.profile_ranks=[0,2]"])
    assert validate(cfg, world_size=4) == []
    assert validate(cfg, world_size=2) == ["logging.profile_ranks: [2] not below the world size 2"]


def test_bf16_gradient_reduction_only_where_micro_batches_are_summed_in_fp32():
    cfg = load_config(None, VALID + ["parallel.reduce_dtype=bf16"])
    assert validate(cfg, world_size=2) == []  # auto: sharded on several GPUs, each micro batch reduced, summed in fp32
    message = "parallel.reduce_dtype: bf16 with unsharded gradient accumulation"
    assert message in validate(cfg, world_size=1)[0]  # auto: unsharded on one GPU
    with pytest.raises(ConfigError, match=message):  # asked for: refused whatever the world size
        load_config(None, VALID + ["parallel.reduce_dtype=bf16", "parallel.grad_accumulation=unsharded"])


def test_cli(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {global_batch_size: 3, micro_batch_size: 2, max_steps: 1}\n")
    proc = keizoku("config", "check", bad, check=False)
    assert proc.returncode == 1
    assert "model.hf_path: required" in proc.stderr and "train.global_batch_size: 3 is not divisible" in proc.stderr
    # a model that is neither a local directory nor a cached hub id: named before anything would load it (21.9)
    proc = keizoku("config", "check", bad, "model.hf_path=m", "data.mock=true", "train.global_batch_size=4", check=False)
    assert proc.returncode == 1 and "model.hf_path: 'm' is neither a local directory nor a hub model" in proc.stderr
    (tmp_path / "m").mkdir()
    (tmp_path / "m/config.json").write_text('{"model_type": "llama", "max_position_embeddings": 8192}')
    out = keizoku("config", "check", bad, f"model.hf_path={tmp_path / 'm'}", "model.init=random", "data.mock=true",
                  "train.global_batch_size=4").stdout
    assert "global_batch_size: 4" in out
    assert keizoku("config", "defaults").stdout == defaults_yaml()
    # the README's command: the example's settings, without its model and data (not on this machine)
    example = ROOT / "examples/llama31_8b_cpt.yaml"
    assert "global_batch_size: 512" in keizoku("config", "check", example, "train.global_batch_size=512",
                                               "--no-inputs").stdout
    proc = keizoku("config", "check", example, check=False)  # with them: each missing one named
    assert proc.returncode == 1 and "model.hf_path: 'meta-llama/Llama-3.1-8B'" in proc.stderr
    assert "data.validation.en[0].path: no dataset tokenized/en-valid" in proc.stderr
    assert Path(ROOT / "examples/llama31_8b_cpt.yaml").exists()
