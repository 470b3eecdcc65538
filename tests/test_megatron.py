"""engine: megatron on the CPU: versions, config checks, and the translation into Megatron-Bridge's dataclasses.

The real runs (import, training, resume, export) need CUDA and are in bench/megatron/ (GPU harness). Here:

- every keizoku setting lands in the right field of Bridge's real dataclasses (the installed release, 0.3.x on
  Python 3.11), and Bridge's own ``runtime_config_update``/``validate`` accepts the result;
- the plan uses only fields that exist in every supported release: 0.2 (NeMo 25.11), 0.4, 0.5 and 0.6 cannot be
  installed here (0.2 was never on PyPI; 0.4+ need Python 3.12), so their fields are read from their source
  (tests/assets/megatron/bridge-fields.json, made by bench/megatron/bridge_fields.py) — and that extraction is
  checked to agree exactly with the installed release's dataclasses;
- Bridge's own dataset path gives the torch engine's samples in the same order, and Megatron's scheduler the
  learning rates keizoku's schedule defines;
- impossible combinations are refused, naming the key.

Bridge imports Transformer Engine (and Megatron-Core Triton) at start-up, neither installed here: ``te_absent`` (harness only,
bench/megatron/te_absent.py) guards those imports; keizoku itself never does.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, SAMPLE_TOKENIZER, keizoku, tiny_llama_and_data
from keizoku.config import ConfigError, load_config, validate
from keizoku.data import blend
from keizoku.engines.megatron import plan as P
from keizoku.engines.megatron import versions
from keizoku.schedule import LRSchedule, run_length

FIELDS = json.loads((Path(__file__).parent / "assets/megatron/bridge-fields.json").read_text())


def _te_absent():
    spec = importlib.util.spec_from_file_location("te_absent", ROOT / "bench/megatron/te_absent.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bridge():
    """Megatron-Bridge, importable without Transformer Engine (harness hook); skipped where not installed."""
    if importlib.util.find_spec("megatron.bridge") is None:
        pytest.skip("megatron-bridge is not installed (make install adds it: constraints/megatron-cpu.txt)")
    _te_absent().install()
    import megatron.bridge.training.config  # noqa: F401

    return versions.detect()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny Llama saved as a HF checkpoint (4 layers, so pipeline × virtual stages divide it) and tokenized data."""
    return tiny_llama_and_data(tmp_path_factory.mktemp("megatron"), num_hidden_layers=4)


def overrides(setup: Path, *more: str) -> list[str]:
    data = setup / "data"
    return ["engine=megatron", f"model.hf_path={setup / 'model'}", f"run_dir={setup / 'run'}",
            f"data.blend=[{{path: {data}/ja_sample_text_document, weight: 0.9}}, "
            f"{{path: {data}/en_sample_text_document, weight: 0.1}}]",
            f"data.validation={{ja: [{{path: {data}/ja_sample_text_document}}]}}",
            "data.seq_length=64", "data.num_workers=0", "train.global_batch_size=8", "train.micro_batch_size=2",
            "train.max_steps=20", "megatron.transformer_impl=local", *more]


def blends(cfg):
    train = blend.blend_of(blend.resolve(cfg.data.blend, "data.blend"), run_length(cfg).tokens)
    valid = None
    for name, entries in cfg.data.validation.items():
        valid = blend.blend_of(blend.resolve(entries, f"data.validation.{name}"), None)
    return train, valid


def make_plan(cfg, release: str, world_size: int = 1, pretrained: str | None = "/imports/x"):
    train, valid = blends(cfg)
    return P.plan_megatron(cfg, release=release, world_size=world_size, train_blend=train, valid_blend=valid,
                  pretrained_checkpoint=pretrained)


# ---------------------------------------------------------------- versions


def test_supported_pairs_and_refusals():
    assert versions.check((0, 2, 2), (0, 15, 3)).release == "0.2"
    assert versions.check((0, 3, 1), (0, 16, 1)).release == "0.3"
    assert versions.check((0, 6, 2), (0, 19, 2)).release == "0.6"
    for bridge, core, said in [((0, 1, 0), (0, 13, 0), "not supported"), ((0, 7, 0), (0, 20, 0), "not supported"),
                               ((0, 6, 2), (0, 16, 1), "runs with Megatron-Core 0.19"),
                               ((0, 2, 2), (0, 19, 0), "runs with Megatron-Core 0.15")]:
        with pytest.raises(versions.VersionError, match=said) as e:
            versions.check(bridge, core)
        assert "Bridge 0.2.x with Core 0.15" in str(e.value)  # the message lists what is supported
    with pytest.raises(versions.VersionError, match="not installed.*NeMo container"):
        versions.check(None, (0, 16, 1))
    assert versions.parse("0.2.0rc6+abc") == (0, 2, 0)


def test_installed_pair_is_detected(bridge):
    import megatron.bridge.package_info as info

    assert bridge.bridge == (info.MAJOR, info.MINOR, info.PATCH)
    assert bridge.release in P_RELEASES


P_RELEASES = sorted(FIELDS)


# ---------------------------------------------------------------- config checks


@pytest.mark.parametrize("more, message", [
    (["megatron.sequence_parallel=true"], "megatron.sequence_parallel: needs megatron.tensor_parallel > 1"),
    (["megatron.virtual_pipeline=2"], "megatron.virtual_pipeline: 2 needs megatron.pipeline_parallel > 1"),
    (["megatron.context_parallel=3"], "megatron.context_parallel: data.seq_length (64) must be divisible by 2 × "
                                      "context_parallel = 6"),
    (["megatron.precision=fp8", "model.dtype=fp32"], "megatron.precision: fp8 together with model.dtype: fp32"),
    (["megatron.precision=fp8"], "megatron.precision: fp8 needs megatron.transformer_impl: transformer_engine"),
    (["megatron.distributed_optimizer=false"], "megatron.overlap_param_gather: needs megatron.distributed_optimizer"),
    (["model.compile=true"], "model.compile: not available with engine: megatron"),
    (["logging.profile_step=5"], "logging.profile_step: engine: torch only"),
    (["model.activation_checkpointing=selective", "model.full_recompute_layers=2"],
     "model.full_recompute_layers: with activation_checkpointing: selective is engine: torch only"),
    (["optim.state_dtype=bf16", "megatron.distributed_optimizer=false", "megatron.overlap_param_gather=false"],
     "optim.state_dtype: bf16 needs megatron.distributed_optimizer: true"),
    (["train.device=cpu"], "train.device: cpu — engine: megatron runs on CUDA GPUs only"),
    (["parallel.backend=gloo"], "parallel.backend: gloo — engine: megatron needs nccl"),
    (["train.on_nan=skip"], "train.on_nan: skip is not available with engine: megatron"),
    (["checkpoint.save_at_end=false"], "checkpoint.save_at_end: false is not available"),
    (["megatron.tensor_parallel=0"], "megatron.tensor_parallel: must be at least 1"),
    (["megatron.context_parallel=2"], "megatron.context_parallel: needs megatron.transformer_impl: transformer_engine"),
    (["megatron.overrides={apply_rope_fusion: false}"], "megatron.overrides.apply_rope_fusion: expected SECTION.field"),
])
def test_impossible_combinations_are_refused(setup, more, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides(setup, *more))
    assert message in str(e.value)


def test_world_size_checks_use_the_model_parallel_layout(setup):
    cfg = load_config(None, overrides(setup, "megatron.tensor_parallel=2", "megatron.pipeline_parallel=2",
                               "megatron.sequence_parallel=true"))
    assert validate(cfg, world_size=8) == []  # data-parallel 2: 8 % (2 × 2) == 0
    assert any("world size 6 is not divisible by tensor × pipeline × context parallel = 2 × 2 × 1" in e
               for e in validate(cfg, world_size=6))
    assert any("train.micro_batch_size × data-parallel size = 2 × 8" in e for e in validate(cfg, world_size=32))
    cfg.parallel.data_parallel_size = 4
    assert any("parallel.data_parallel_size: 4 differs from world size / (tensor × pipeline × context parallel) = 2"
               in e for e in validate(cfg, world_size=8))
    torch_cfg = load_config(None, overrides(setup, "engine=torch"))
    assert validate(torch_cfg, world_size=1) == []  # the megatron section means nothing to engine: torch


# ---------------------------------------------------------------- the plan against every release's fields


EVERYTHING = ["model.dtype=fp32", "model.activation_checkpointing=full", "model.tokenizer={tok}",
              "schedule.kind=wsd", "schedule.warmup_steps=3", "eval.interval=5", "logging.wandb=true",
              "megatron.pipeline_parallel=2", "megatron.virtual_pipeline=2", "megatron.tensor_parallel=2",
              "megatron.sequence_parallel=true", "megatron.context_parallel=2", "megatron.async_save=true",
              "checkpoint.resume=none", "megatron.transformer_impl=transformer_engine"]


@pytest.mark.parametrize("release", P_RELEASES)
@pytest.mark.parametrize("variant", ["defaults", "everything", "mock+random+te"])
def test_plan_uses_only_fields_of_each_release(setup, release, variant):
    more = {"defaults": [], "everything": [m.format(tok=SAMPLE_TOKENIZER) for m in EVERYTHING],
            "mock+random+te": ["data.blend=[]", "data.validation={}", "data.mock=true", "model.init=random",
                               "megatron.transformer_impl=transformer_engine", "megatron.precision=fp8",
                               "megatron.overrides={model.apply_rope_fusion: false, ddp.bucket_size: 1000000}"]}
    cfg = load_config(None, overrides(setup, *more[variant]))
    p = make_plan(cfg, release, world_size=16)
    fields = FIELDS[release]["classes"]
    assert P.unknown_fields(p, fields) == []
    assert ("validation" in p) == (release >= "0.4")  # eval settings moved out of TrainingConfig in 0.4
    evaluation = p["validation"] if "validation" in p else p["train"]
    assert set(evaluation) >= {"eval_iters", "eval_interval"}
    assert P.section_class(p, "dataset") == ("MockGPTDatasetConfig" if variant == "mock+random+te" else "GPTDatasetConfig")


def test_an_unknown_field_is_reported_for_the_release_that_lacks_it(setup):
    cfg = load_config(None, overrides(setup))
    p = make_plan(cfg, "0.6")
    p["train"]["eval_iters"] = 1  # 0.6 moved it to ValidationConfig: a plan for 0.6 must not put it here…
    p["model"]["no_such_field"] = 1
    assert P.unknown_fields(p, FIELDS["0.6"]["classes"]) == ["model.no_such_field"]  # …but TrainingConfig still
    p2 = make_plan(cfg, "0.2")                                                       # accepts it (deprecated)
    p2["validation"] = {"eval_iters": 1}
    assert P.unknown_fields(p2, FIELDS["0.2"]["classes"]) == ["validation (no such ConfigContainer section)"]


def test_field_table_agrees_with_the_installed_release(bridge):
    """The source extraction behind bridge-fields.json gives exactly the installed dataclasses' fields."""
    from keizoku.engines.megatron.container import config_classes, init_fields

    table = FIELDS[bridge.release]["classes"]
    real = config_classes()
    assert set(table) == {n for n in real}
    for name, cls in real.items():
        assert sorted(init_fields(cls)) == table[name], name


# ---------------------------------------------------------------- real Bridge dataclasses


def build(setup, cfg, world_size: int, monkeypatch):
    from keizoku.engines.megatron import container
    from megatron.bridge.training.config import runtime_config_update

    monkeypatch.setenv("WORLD_SIZE", str(world_size))  # what Bridge reads for the data-parallel size
    release = versions.detect().release
    p = make_plan(cfg, release, world_size=world_size)
    provider = container.hf_bridge(cfg.model.hf_path, False).to_megatron_provider(load_weights=False)
    c = container.build(p, provider)
    runtime_config_update(c)  # Bridge's own mixed-precision set-up, finalize() and validate()
    return c


def evaluation(c):
    return c.validation if hasattr(c, "validation") else c.train


def test_every_setting_lands_in_its_bridge_field(bridge, setup, monkeypatch, tmp_path):
    from megatron.bridge.models.gpt_provider import local_layer_spec

    resume = tmp_path / "elsewhere"
    resume.mkdir()
    cfg = load_config(None, overrides(
        setup, "train.seed=7", "data.seed=99", f"data.cache_dir={tmp_path / 'cache'}", "optim.lr=2e-3",
        "optim.min_lr=1e-4", "optim.betas=[0.85,0.97]", "optim.eps=1e-7", "optim.weight_decay=0.05",
        "optim.grad_clip=0.5", "schedule.kind=wsd", "schedule.warmup_steps=4", "schedule.decay_fraction=0.25",
        "checkpoint.interval=5", "checkpoint.keep_last=2", f"checkpoint.resume={resume}", "eval.interval=10",
        "eval.batches=8", "logging.interval=3", "logging.wandb=true", "logging.wandb_project=cpt",
        f"model.tokenizer={SAMPLE_TOKENIZER}", "model.activation_checkpointing=full",
        "megatron.tensor_parallel=2", "megatron.pipeline_parallel=2", "megatron.virtual_pipeline=2",
        "megatron.sequence_parallel=true", "megatron.async_save=true",
        "megatron.overrides={ddp.bucket_size: 1234567, model.init_method_std: 0.01}"))
    c = build(setup, cfg, world_size=8, monkeypatch=monkeypatch)
    run = Path(cfg.run_dir).absolute()
    train, valid = blends(cfg)
    assert c.data_parallel_size == 2
    # train / rng
    assert (c.train.micro_batch_size, c.train.global_batch_size, c.train.train_iters) == (2, 8, 20)
    assert c.train.exit_signal_handler and c.rng.seed == 7
    # eval: 8 micro batches × 2 sequences × 2 data-parallel ranks = 32 sequences = 4 global batches
    assert (evaluation(c).eval_iters, evaluation(c).eval_interval) == (4, 10)
    # optimizer and DDP
    o = c.optimizer
    assert (o.optimizer, o.lr, o.min_lr, o.adam_beta1, o.adam_beta2, o.adam_eps, o.weight_decay, o.clip_grad) == \
        ("adam", 2e-3, 1e-4, 0.85, 0.97, 1e-7, 0.05, 0.5)
    assert o.use_distributed_optimizer and c.ddp.use_distributed_optimizer
    assert c.ddp.overlap_grad_reduce and c.ddp.overlap_param_gather and c.ddp.bucket_size == 1234567
    # schedule: warmup W−1 steps from lr/W; WSD's linear anneal over round(0.25 × 20) = 5 steps, ending at step 19
    s = c.scheduler
    assert (s.lr_warmup_iters, s.lr_warmup_init, s.lr_decay_iters) == (3, 2e-3 / 4, 19)
    assert (s.lr_decay_style, s.lr_wsd_decay_style, s.lr_wsd_decay_iters) == ("WSD", "linear", 5)
    assert (s.start_weight_decay, s.end_weight_decay) == (0.05, 0.05)
    # data: keizoku's blends, seed, sequence length, and the flags engine: torch gives GPTDataset
    d = c.dataset
    assert d.blend_per_split[0] == tuple(train) and d.blend_per_split[1] == tuple(valid)
    assert d.blend_per_split[2] is None and d.split is None and d.blend is None
    assert abs(sum(train[1]) - 1) < 1e-9 and [Path(x).name for x in train[0]] == \
        ["ja_sample_text_document", "en_sample_text_document"]
    assert (d.random_seed, d.sequence_length, d.num_workers, d.path_to_cache) == (99, 64, 0, str(tmp_path / "cache"))
    assert not (d.reset_position_ids or d.reset_attention_mask or d.eod_mask_loss)
    # checkpoints
    ck = c.checkpoint
    assert (ck.save, ck.load, ck.pretrained_checkpoint) == (str(run / "checkpoints"), str(resume), "/imports/x")
    assert (ck.save_interval, ck.most_recent_k, ck.ckpt_format, ck.async_save) == (5, 2, "torch_dist", True)
    assert ck.exit_on_missing_checkpoint  # an explicit checkpoint.resume must exist
    # logging, tokenizer
    lg = c.logger
    assert (lg.log_interval, lg.tensorboard_dir) == (3, str(run / "tensorboard"))
    assert (lg.wandb_project, lg.wandb_exp_name, lg.wandb_save_dir) == ("cpt", "run", str(run / "wandb"))
    assert (c.tokenizer.tokenizer_type, c.tokenizer.tokenizer_model) == ("HuggingFaceTokenizer", str(SAMPLE_TOKENIZER))
    # the model: parallel layout, recompute, layer implementation, precision
    m = c.model
    assert (m.tensor_model_parallel_size, m.pipeline_model_parallel_size, m.virtual_pipeline_model_parallel_size,
            m.context_parallel_size, m.sequence_parallel, m.seq_length) == (2, 2, 2, 1, True, 64)
    assert (m.recompute_granularity, m.recompute_method, m.recompute_num_layers) == ("full", "uniform", 1)
    assert m.transformer_layer_spec is local_layer_spec and m.transformer_impl == "local"
    assert not (m.apply_rope_fusion or m.gradient_accumulation_fusion or m.masked_softmax_fusion
                or m.cross_entropy_loss_fusion or m.persist_layer_norm)
    assert m.init_method_std == 0.01
    assert (m.num_layers, m.hidden_size, m.vocab_size) == (4, 64, 8002)  # the HF architecture, via AutoBridge
    assert c.mixed_precision is not None and m.bf16 and o.bf16 and m.params_dtype == torch.bfloat16


def test_fp32_and_max_tokens(bridge, setup, monkeypatch):
    # 10,240 tokens at 8 × 64 tokens per step: 20 steps
    cfg = load_config(None, overrides(setup, "model.dtype=fp32", "train.max_steps=null", "train.max_tokens=10240",
                               "eval.interval=0", "megatron.distributed_optimizer=false",
                               "megatron.overlap_param_gather=false"))
    c = build(setup, cfg, world_size=1, monkeypatch=monkeypatch)
    assert c.train.train_iters == 20 and c.mixed_precision is None
    assert not c.model.bf16 and c.model.params_dtype == torch.float32 and c.optimizer.params_dtype == torch.float32
    assert not c.optimizer.use_distributed_optimizer and not c.ddp.use_distributed_optimizer
    assert evaluation(c).eval_interval == 21  # eval.interval 0: none during training
    assert c.checkpoint.load == c.checkpoint.save and not c.checkpoint.exit_on_missing_checkpoint


def test_full_recompute_layers_is_megatrons_block_recompute(bridge, setup):
    model = make_plan(load_config(None, overrides(setup, "model.full_recompute_layers=3")), bridge.release)["model"]
    assert (model["recompute_granularity"], model["recompute_method"], model["recompute_num_layers"]) == \
        ("full", "block", 3)


def test_bf16_optimizer_state_is_megatrons_precision_aware_optimizer(bridge, setup, monkeypatch):
    from keizoku.engines.megatron.trainer import missing_packages

    cfg = load_config(None, overrides(setup, "optim.state_dtype=bf16"))
    o = make_plan(cfg, bridge.release)["optimizer"]
    assert o["use_precision_aware_optimizer"] and o["use_distributed_optimizer"]
    assert o["exp_avg_dtype"] == o["exp_avg_sq_dtype"] == "DTYPE:bfloat16"
    if importlib.util.find_spec("transformer_engine") is None:  # as on the CI machine: refused before Bridge starts
        assert "optim.state_dtype: bf16 with engine: megatron needs Transformer Engine" in missing_packages(cfg)
    else:
        assert missing_packages(cfg) is None
        c = build(setup, cfg, world_size=1, monkeypatch=monkeypatch)
        assert c.optimizer.exp_avg_dtype == c.optimizer.exp_avg_sq_dtype == torch.bfloat16


@pytest.mark.parametrize("recipe, preset", list(P.FP8_PRESETS.items()))
def test_fp8_recipes_name_bridge_presets(bridge, setup, recipe, preset):
    from megatron.bridge.training.mixed_precision import get_mixed_precision_config

    cfg = load_config(None, overrides(setup, "megatron.transformer_impl=transformer_engine", "megatron.precision=fp8",
                               f"megatron.fp8_recipe={recipe}"))
    p = make_plan(cfg, bridge.release)
    assert p["container"]["mixed_precision"] == preset
    mp = get_mixed_precision_config(preset)  # exists in this release, and means FP8 in bf16
    assert mp.bf16 and mp.fp8 is not None


def test_a_field_the_release_lacks_is_an_error(bridge, setup):
    from keizoku.engines.megatron import container

    cfg = load_config(None, overrides(setup, "megatron.overrides={ddp.no_such_knob: 1}"))
    provider = container.hf_bridge(cfg.model.hf_path, False).to_megatron_provider(load_weights=False)
    with pytest.raises(container.BridgeError, match="DistributedDataParallelConfig .* no field.*no_such_knob"):
        container.build(make_plan(cfg, bridge.release), provider)


@pytest.mark.parametrize("kind, warmup", [("cosine", 0), ("cosine", 5), ("wsd", 5), ("constant", 5), ("cosine", 40)])
def test_megatron_scheduler_gives_keizokus_learning_rates(bridge, setup, monkeypatch, kind, warmup):
    from megatron.bridge.training.optim import _get_scheduler

    steps = 40
    cfg = load_config(None, overrides(setup, f"schedule.kind={kind}", f"schedule.warmup_steps={warmup}",
                                      f"train.max_steps={steps}", "optim.lr=1e-3", "optim.min_lr=1e-4"))
    schedule = LRSchedule.of(cfg.optim, cfg.schedule, steps)
    c = build(setup, cfg, world_size=1, monkeypatch=monkeypatch)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = _get_scheduler(c.optimizer, c.scheduler, optimizer)
    megatron, ours = [], []
    for k in range(steps):  # the lr optimizer step k uses; Megatron steps the scheduler by the global batch
        megatron.append(optimizer.param_groups[0]["lr"])
        ours.append(schedule.lr_at(k))
        scheduler.step(increment=c.train.global_batch_size)
    assert megatron[:warmup] == pytest.approx(ours[:warmup], rel=1e-12)  # warmup: identical
    assert megatron[-1] == pytest.approx(ours[-1], rel=1e-12)  # the last step: min_lr (or lr)
    if kind == "cosine" and 0 < warmup < steps:  # the decay starts one step earlier: at most 1/(steps − W) of it
        assert max(abs(a - b) for a, b in zip(megatron, ours)) <= (1e-3 - 1e-4) * math.pi / (steps - warmup)
        assert megatron != pytest.approx(ours, rel=1e-9)
    else:
        assert megatron == pytest.approx(ours, rel=1e-12)


def test_bridge_dataset_path_gives_the_torch_engines_samples(bridge, setup, monkeypatch, tmp_path):
    """Bridge's own pretraining dataset provider and keizoku's blend.build: the same samples, in order."""
    import torch.distributed as dist
    from megatron.bridge.data.utils import pretrain_train_valid_test_datasets_provider
    from megatron.bridge.training.tokenizers.tokenizer import build_tokenizer

    from keizoku.data.tokenizer import load_tokenizer, tokenizer_fingerprint

    cfg = load_config(None, overrides(setup, "data.seed=4321", f"data.cache_dir={tmp_path / 'bridge-cache'}"))
    c = build(setup, cfg, world_size=1, monkeypatch=monkeypatch)
    c.dataset.tokenizer = build_tokenizer(c.tokenizer)
    samples = c.train.train_iters * c.train.global_batch_size
    store = tempfile.mkdtemp(prefix="keizoku-pg-")
    dist.init_process_group("gloo", init_method=f"file://{store}/store", rank=0, world_size=1)
    try:
        theirs, _, _ = pretrain_train_valid_test_datasets_provider([samples, 8, 0], c.dataset)
        tok = load_tokenizer(cfg.model.hf_path)
        common = dict(seq_length=64, train_samples=samples, eval_samples=8,
                      tokenizer=blend.MegatronTokenizerShim(tok.eos_id, tok.vocab_size, tokenizer_fingerprint(tok)))
        ours, _ = blend.build(cfg.data, cache_dir=tmp_path / "keizoku-cache", **common)
        cfg.data.seed = 4322
        other_seed, _ = blend.build(cfg.data, cache_dir=tmp_path / "keizoku-cache-2", **common)
    finally:
        dist.destroy_process_group()
    assert c.dataset.tokenizer.eod == tok.eos_id
    assert len(theirs) == len(ours) == samples == 160
    for i in range(samples):
        for key in ("tokens", "labels", "position_ids"):
            assert torch.equal(torch.as_tensor(theirs[i][key]), torch.as_tensor(ours[i][key])), (i, key)
    # the comparison can fail: another seed is another order
    assert not all(torch.equal(torch.as_tensor(theirs[i]["tokens"]), torch.as_tensor(other_seed[i]["tokens"]))
                   for i in range(8))


# ---------------------------------------------------------------- import cache key, CLI, engine: torch


def test_fingerprint_is_content_based(setup, tmp_path):
    from keizoku.engines.megatron.importer import ImportError_, cache_dir, fingerprint

    a = fingerprint(setup / "model")
    copy = tmp_path / "copy"
    shutil.copytree(setup / "model", copy)
    assert fingerprint(copy) == a  # a copy elsewhere is the same checkpoint
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF  # one byte of the last tensor
    weights.write_bytes(bytes(data))
    assert fingerprint(copy) != a
    (copy / "config.json").write_text((setup / "model/config.json").read_text().replace("8002", "8003"))
    assert fingerprint(copy) not in (a,)
    assert cache_dir("/c", a, "0.6") == Path(f"/c/{a[:16]}-bridge0.6")
    with pytest.raises(ImportError_, match="not a local Hugging Face checkpoint"):
        fingerprint(tmp_path / "nothing")


def test_train_and_import_refuse_without_a_gpu(bridge, setup, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    cfg = tmp_path / "m.yaml"
    cfg.write_text("")
    proc = keizoku("train", cfg, *overrides(setup), check=False)
    assert proc.returncode == 1 and "needs CUDA GPUs" in proc.stderr, proc.stderr
    proc = keizoku("convert", "import", "--engine", "megatron", setup / "model", "--out", tmp_path / "imp", check=False)
    assert proc.returncode == 1 and "needs a CUDA GPU" in proc.stderr, proc.stderr
    assert not (tmp_path / "imp").exists()


def _restoring_signals(fn):
    import functools
    import signal

    @functools.wraps(fn)
    def wrapper(*a, **kw):
        saved = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)}
        try:
            return fn(*a, **kw)
        finally:
            for sig, old in saved.items():
                signal.signal(sig, old)
    return wrapper


def _wait_for(condition) -> bool:
    for _ in range(200):
        if condition():
            return True
        time.sleep(0.01)
    return False


@_restoring_signals
def test_walltime_signals_reach_bridges_exit_handler(bridge):
    """SIGUSR1/SIGUSR2 (walltime warnings) reach Bridge's real exit handler (which watches SIGTERM only), also
    when they come before Bridge installed it (import, model build, checkpoint load): then at training start."""
    import os
    import signal

    from megatron.bridge.training.utils.sig_utils import DistributedSignalHandler

    from keizoku.engines.megatron.reporting import WalltimeRelay

    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # as in a fresh `keizoku train`: Bridge has not started
    said = []
    relay = WalltimeRelay(deferrable=True, log=said.append)
    os.kill(os.getpid(), signal.SIGUSR1)  # before Bridge: kept (the default SIGTERM would end the process)
    assert _wait_for(lambda: relay.pending == signal.SIGUSR1)
    handler = DistributedSignalHandler(signal.SIGTERM).__enter__()  # what Bridge's GlobalState does in pretrain
    assert not handler._signal_received
    relay.on_train_start()  # Bridge's on_train_start event
    assert handler._signal_received and relay.pending is None
    handler.release()
    for sig in (signal.SIGUSR1, signal.SIGUSR2):  # while training: straight to Bridge's handler
        handler = DistributedSignalHandler(signal.SIGTERM).__enter__()
        os.kill(os.getpid(), sig)
        assert _wait_for(lambda: handler._signal_received), sig
        handler.release()
    assert "SIGUSR1 before training started" in said[0] and "SIGUSR2: Megatron-Bridge saves" in said[-1], said


def test_walltime_signal_without_callbacks_is_a_sigterm(bridge):
    """Bridge 0.2 (no callbacks): a warning before Bridge's handler exists ends the process like SIGTERM."""
    code = ("import os, signal, time\n"
            "from keizoku.engines.megatron.reporting import WalltimeRelay\n"
            "WalltimeRelay(deferrable=False)\n"
            "os.kill(os.getpid(), signal.SIGUSR2)\n"
            "time.sleep(5)\n"
            "print('still running')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -15 and "still running" not in proc.stdout, (proc.returncode, proc.stderr[-2000:])


def test_reporter_registers_with_bridges_callback_manager(bridge, setup):
    assert P.has_callbacks("0.3") and P.has_callbacks("0.6") and not P.has_callbacks("0.2")
    if not P.has_callbacks(bridge.release):
        pytest.skip(f"{bridge} has no callbacks (keizoku leaves validation to Bridge there)")
    from megatron.bridge.training.callbacks import CallbackManager

    from keizoku.engines.megatron.reporting import Reporter, WalltimeRelay

    manager = CallbackManager()
    Reporter(load_config(None, overrides(setup)), 20, WalltimeRelay(True, signals=())).register(manager)
    for event in Reporter.EVENTS:
        assert manager.has_callbacks(event), event


def test_a_step_logs_the_rate_its_update_used_and_its_phase(setup, tmp_path):
    """Bridge steps its LR scheduler inside the step: at on_train_step_end the optimizer already holds the next
    step's rate. The record has the rate read at the step's start (the one the update used), and the phase."""
    from types import SimpleNamespace

    import torch.distributed as dist

    from keizoku.engines.megatron.reporting import Reporter, WalltimeRelay
    from keizoku.metrics import MetricsLogger
    from keizoku.rundir import read_jsonl

    cfg = load_config(None, overrides(setup, f"run_dir={tmp_path}"))
    reporter = Reporter(cfg, 20, WalltimeRelay(True, signals=()), phase="anneal")
    reporter.metrics = MetricsLogger(tmp_path, console=False)
    groups = [{"lr": 2e-3}]
    ctx = SimpleNamespace(state=SimpleNamespace(train_state=SimpleNamespace(step=4)), loss_dict={"lm loss": 3.5},
                          grad_norm=0.7, optimizer=SimpleNamespace(param_groups=groups))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        reporter.on_train_step_start(ctx)
        groups[0]["lr"] = 1.5e-3  # the scheduler's step, inside Bridge's train step
        reporter.on_train_step_end(ctx)
    finally:
        dist.destroy_process_group()
        reporter.metrics.close()
    [record] = read_jsonl(tmp_path / "metrics.jsonl")
    assert (record["step"], record["lr"], record["loss"], record["phase"]) == (5, 2e-3, 3.5, "anneal")


def test_metrics_records_have_the_torch_engines_schema(setup, tmp_path):
    """metrics.jsonl of engine: megatron (reporting.train_record, keizoku.metrics) has the keys a real engine: torch
    run writes, for two validation sets and the evaluation before step 1."""
    from keizoku.engines.megatron.reporting import train_record
    from keizoku.metrics import MetricsLogger, eval_values

    run = tmp_path / "torch-run"
    cfg = tmp_path / "t.yaml"
    cfg.write_text("")
    data = setup / "data"
    keizoku("train", cfg, *overrides(setup, "engine=torch", f"run_dir={run}", "train.max_steps=1",
                                     "eval.batches=1", "eval.at_start=true", "logging.tensorboard=false",
                                     f"data.validation={{ja: [{{path: {data}/ja_sample_text_document}}], "
                                     f"en: [{{path: {data}/en_sample_text_document}}]}}"))
    torch_records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    ours = tmp_path / "metrics.jsonl"
    m = MetricsLogger(tmp_path, console=False)
    m.log("eval", 0, eval_values({"ja": 8.9, "en": 9.1}))
    m.log("train", 1, train_record(loss=8.95, lr=3e-3, grad_norm=1.5, step_s=0.5, tokens_per_step=512, world=2,
                                   step=1, memory_gib=None))
    m.log("eval", 1, eval_values({"ja": 8.7, "en": 8.8}))
    m.close()
    megatron_records = [json.loads(line) for line in ours.read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in torch_records] == [("eval", 0), ("train", 1), ("eval", 1)]
    for a, b in zip(torch_records, megatron_records):
        torch_keys = set(a) - {"data_share", "memory_gib", "mfu"}  # torch-engine-only measurements
        assert torch_keys == set(b), (sorted(a), sorted(b))
    assert megatron_records[1]["tokens_per_s"] == 1024 and megatron_records[1]["tokens_per_s_per_device"] == 512
    assert megatron_records[0]["ja_ppl"] == pytest.approx(math.exp(8.9))


def test_validation_batches_are_the_torch_engines_eval_samples(bridge, setup, tmp_path):
    """Each validation set's samples (keizoku's own evaluation of engine: megatron) equal those blend.build
    gives engine: torch; each data-parallel rank reads its share of micro batches with the keys Bridge reads."""
    import torch.distributed as dist

    from keizoku.data.tokenizer import load_tokenizer, tokenizer_fingerprint
    from keizoku.engines.megatron.reporting import validation_batches, validation_datasets

    data = setup / "data"
    cfg = load_config(None, overrides(setup, f"run_dir={tmp_path / 'run'}",
                                      f"data.validation={{ja: [{{path: {data}/ja_sample_text_document}}], "
                                      f"en: [{{path: {data}/en_sample_text_document}}]}}"))
    dp, batches, micro = 2, 3, cfg.train.micro_batch_size
    eval_samples = batches * micro * dp
    dist.init_process_group("gloo", init_method=f"file://{tempfile.mkdtemp(prefix='keizoku-pg-')}/store", rank=0,
                            world_size=1)  # megatron-core's dataset builder asks for the rank
    try:
        ours = validation_datasets(cfg, eval_samples)
        tok = load_tokenizer(str(setup / "model"))
        shim = blend.MegatronTokenizerShim(tok.eos_id, tok.vocab_size, tokenizer_fingerprint(tok))
        _, theirs = blend.build(cfg.data, seq_length=cfg.data.seq_length, train_samples=16,
                                eval_samples=eval_samples, tokenizer=shim, cache_dir=tmp_path / "torch-cache")
    finally:
        dist.destroy_process_group()
    assert list(ours) == list(theirs) == ["ja", "en"]
    for name in ours:
        for i in range(eval_samples):
            assert torch.equal(ours[name][i]["tokens"], theirs[name][i]["tokens"]), (name, i)
        seen = []
        for rank in range(dp):
            micro_batches = list(validation_batches(ours[name], eval_samples, micro, rank, dp))
            assert len(micro_batches) == batches
            assert {"tokens", "labels", "loss_mask", "position_ids"} <= set(micro_batches[0])
            assert micro_batches[0]["tokens"].shape == (micro, cfg.data.seq_length)
            seen += [b["tokens"] for b in micro_batches]
        assert len({tuple(t.flatten().tolist()) for t in seen}) == batches * dp  # no sample read twice


def test_launch_driver_sees_megatron_checkpoints(setup, tmp_path):
    """The walltime chain's completeness check (launch/driver.py, through rundir.latest_checkpoint) reads
    Megatron-Bridge's layout: the newest iteration named by its tracker file (Bridge's
    checkpoint_utils.get_checkpoint_tracker_filename), only if that checkpoint directory (get_checkpoint_name:
    iter_NNNNNNN) exists."""
    from keizoku.launch.driver import LaunchPlan, is_complete
    from keizoku.rundir import latest_checkpoint

    run = tmp_path / "run"
    ckpt = run / "checkpoints"
    ckpt.mkdir(parents=True)
    tracker = ckpt / "latest_checkpointed_iteration.txt"
    assert latest_checkpoint(run) is None
    tracker.write_text("20")
    assert latest_checkpoint(run) is None  # a tracker without its checkpoint: not complete
    (ckpt / "iter_0000010").mkdir()
    (ckpt / "iter_0000020").mkdir()
    newest = latest_checkpoint(run)
    assert (newest.step, newest.path, newest.engine) == (20, ckpt / "iter_0000020", "megatron")
    from keizoku.launch.status import run_status  # what `keizoku status` shows

    shown = run_status(run, query_scheduler=False)
    assert (shown.checkpoint_step, shown.checkpoint) == (20, str(ckpt / "iter_0000020"))
    config = tmp_path / "m.yaml"
    config.write_text("")
    plan = LaunchPlan(train_args=[str(config), *overrides(setup, f"run_dir={run}", "train.max_steps=30")],
                      run_dir=str(run))
    assert is_complete(plan) is None
    tracker.write_text("30\n")
    (ckpt / "iter_0000030").mkdir()
    assert is_complete(plan) == "training is complete (step 30 of 30); nothing to run"


def test_engine_torch_never_imports_megatron_bridge(setup, tmp_path):
    """A real (two-step) torch-engine run, then: no megatron.bridge module was loaded."""
    code = f"""
import sys
from keizoku.config import load_config
from keizoku.engines import train
cfg = load_config(None, {overrides(setup, 'engine=torch', f'run_dir={tmp_path / "torch-run"}', 'train.max_steps=2',
                             'eval.interval=0', 'eval.at_start=false', 'logging.tensorboard=false')!r})
assert train(cfg) == 0
loaded = sorted(m for m in sys.modules if m.startswith("megatron.bridge"))
assert not loaded, loaded
print("no megatron.bridge")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "no megatron.bridge" in proc.stdout, proc.stderr[-3000:]


# ---------------------------------------------------------------- phases and extensions


def phased_overrides(setup: Path, *more: str) -> list[str]:
    data = setup / "data"
    base = [o for o in overrides(setup) if not o.startswith("train.max_steps")]
    return base + [
        "phases=[{name: main, max_steps: 12, warmup_steps: 3}, "
        f"{{name: anneal, max_steps: 8, decay: cosine, blend: [{{path: {data}/ja_sample_text_document}}]}}]",
        "extensions=[{name: more, max_steps: 10, warmup_steps: 4, lr: 5.0e-4, decay: linear}]",
        "optim.lr=1e-3", "optim.min_lr=1e-4", *more]


def segment_plan(cfg, segment, release):
    from dataclasses import replace

    seg_cfg = replace(cfg, data=blend.segment_data(cfg, segment))
    train = blend.blend_of(blend.resolve(seg_cfg.data.blend, "x"), None)
    return P.plan_megatron(seg_cfg, release=release, world_size=1, train_blend=train, valid_blend=None,
                           pretrained_checkpoint=None, segment=segment)


@pytest.mark.parametrize("release", P_RELEASES)
def test_each_phase_is_a_bridge_run_of_its_own_data_and_schedule(setup, release):
    from keizoku.schedule import run_plan

    cfg = load_config(None, phased_overrides(setup))
    segments = run_plan(cfg).segments
    plans = [segment_plan(cfg, s, release) for s in segments]
    assert [p["train"]["train_iters"] for p in plans] == [12, 20, 30]
    assert [p["dataset"]["random_seed"] for p in plans] == [cfg.data.seed + i for i in range(3)]
    assert plans[1]["dataset"]["blend_per_split"][0][0] == [str(setup / "data/ja_sample_text_document")]
    assert plans[2]["dataset"]["blend_per_split"][0][0] == [str(setup / "data/ja_sample_text_document")]  # as it ended
    assert all(p["scheduler"]["override_opt_param_scheduler"] for p in plans)
    assert [(p["optimizer"]["lr"], p["optimizer"]["min_lr"]) for p in plans] == [
        (1e-3, 1e-4), (1e-3, 1e-4), (5e-4, 1e-4)]
    for p in plans:
        assert P.unknown_fields(p, FIELDS[release]["classes"]) == []


def test_megatron_scheduler_gives_each_phases_rates(bridge, setup, monkeypatch):
    """Bridge's real scheduler, built from each segment's plan and resumed at the segment's first step (as from the
    last one's checkpoint), gives keizoku's rate at every step of the segment: the warmup and the re-warm step for
    step, the decays within 1/(steps − W) of theirs and equal at their last step."""
    from megatron.bridge.training.config import runtime_config_update
    from megatron.bridge.training.optim import _get_scheduler

    from keizoku.engines.megatron import container
    from keizoku.schedule import run_plan

    cfg = load_config(None, phased_overrides(setup))
    run = run_plan(cfg)
    monkeypatch.setenv("WORLD_SIZE", "1")
    provider = container.hf_bridge(cfg.model.hf_path, False).to_megatron_provider(load_weights=False)
    for seg in run.segments:
        c = container.build(segment_plan(cfg, seg, bridge.release), provider)
        runtime_config_update(c)
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        scheduler = _get_scheduler(c.optimizer, c.scheduler, optimizer)
        gbs = c.train.global_batch_size
        scheduler.num_steps = seg.first_step * gbs  # what the checkpoint of the segment before restores
        scheduler.step(increment=0)
        megatron, ours = [], []
        for k in range(seg.first_step, seg.end_step):
            megatron.append(optimizer.param_groups[0]["lr"])
            ours.append(run.lr_at(k))
            scheduler.step(increment=gbs)
        w = seg.schedule.warmup_steps
        assert megatron[:w or 1] == pytest.approx(ours[:w or 1], rel=1e-12), seg.name  # warmup, or the first step
        assert megatron[-1] == pytest.approx(ours[-1], rel=1e-12), seg.name
        span = seg.schedule.lr - seg.schedule.min_lr
        assert max(abs(a - b) for a, b in zip(megatron, ours)) <= span * math.pi / (seg.steps - w), seg.name
