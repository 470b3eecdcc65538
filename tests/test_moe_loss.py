"""The router load-balancing loss of mixture-of-experts models (engine torch): keizoku's loss against transformers'
own ``loss`` with ``output_router_logits``, the setting, and a short training run that logs it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from conftest import EN_SAMPLE, keizoku, tiny_llama_and_data
from keizoku.config import KeizokuConfig, validate
from keizoku.engines.torch.loss import IGNORE_INDEX, CausalLMWithLoss, has_router_aux_loss, router_aux_loss_coef

VOCAB = 300


def _tiny(kind: str, vocab: int = VOCAB, **extra):
    from transformers import AutoModelForCausalLM, LlamaConfig, MixtralConfig, OlmoeConfig, Qwen2MoeConfig

    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, **extra)
    config = {
        "mixtral": lambda: MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **common),
        "qwen2_moe": lambda: Qwen2MoeConfig(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                            shared_expert_intermediate_size=32, **common),
        "olmoe": lambda: OlmoeConfig(num_experts=4, num_experts_per_tok=2, **common),
        "llama": lambda: LlamaConfig(**common),
    }[kind]()
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def _batch():
    tokens = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(1))
    # keizoku's labels are the next tokens; transformers shifts its labels itself: the last position predicts nothing
    labels = torch.cat([tokens[:, 1:], torch.full((2, 1), IGNORE_INDEX)], dim=1)
    return tokens, labels


def _grads(model) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "olmoe"])
def test_loss_and_gradients_equal_transformers_loss_with_router_logits(kind):
    """CausalLMWithLoss(router_aux=True), full logits and chunked: the LM loss and transformers' aux_loss, whose
    combination as the trainer weighs them (mean token loss + coef × aux) is transformers' own ``loss`` with
    output_router_logits=True, in value and in every parameter's gradient (the routers' included); on keizoku's
    plain batch (no attention mask) as with an all-ones mask."""
    model = _tiny(kind)
    tokens, labels = _batch()
    coef = model.config.router_aux_loss_coef
    assert has_router_aux_loss(model) and coef > 0
    out = model(input_ids=tokens, labels=tokens, output_router_logits=True, use_cache=False)
    out.loss.backward()
    ref_grads = _grads(model)
    assert any("gate" in n or "router" in n for n in ref_grads)
    masked = model(input_ids=tokens, attention_mask=torch.ones_like(tokens), labels=tokens,
                   output_router_logits=True, use_cache=False)
    assert masked.aux_loss.item() == pytest.approx(out.aux_loss.item(), rel=1e-6)
    counted = (labels != IGNORE_INDEX).sum()
    for chunk in (0, 7):
        model.zero_grad(set_to_none=True)
        lm_sum, aux = CausalLMWithLoss(model, chunk, router_aux=True)(tokens, labels)
        assert aux.item() == pytest.approx(out.aux_loss.item(), rel=1e-6)
        total = lm_sum / counted + coef * aux
        assert total.item() == pytest.approx(out.loss.item(), rel=1e-6)
        total.backward()
        got = _grads(model)
        assert got.keys() == ref_grads.keys()
        assert all(_rel(got[n], ref_grads[n]) < 1e-5 for n in ref_grads), chunk


def test_the_coefficient_setting():
    mixtral, llama = _tiny("mixtral", router_aux_loss_coef=0.02), _tiny("llama")
    assert router_aux_loss_coef(mixtral, None) == 0.02  # the model config's own
    assert router_aux_loss_coef(mixtral, 0.5) == 0.5
    assert router_aux_loss_coef(mixtral, 0.0) is None  # off
    assert not has_router_aux_loss(llama) and router_aux_loss_coef(llama, None) is None
    with pytest.raises(ValueError, match=r"model.router_aux_loss_coef: 0.01 applies only to mixture-of-experts"):
        router_aux_loss_coef(llama, 0.01)
    # off: the wrapper's loss is transformers' loss without output_router_logits, the plain LM loss
    tokens, labels = _batch()
    with torch.no_grad():
        plain = CausalLMWithLoss(mixtral, 0)(tokens, labels) / (labels != IGNORE_INDEX).sum()
        assert plain.item() == pytest.approx(mixtral(input_ids=tokens, labels=tokens).loss.item(), rel=1e-6)
    cfg = KeizokuConfig()
    cfg.model.router_aux_loss_coef = -0.1
    assert "model.router_aux_loss_coef: must be >= 0 (0: off), not -0.1" in validate(cfg)


@pytest.fixture(scope="module")
def moe_setup(tmp_path_factory):
    base = tiny_llama_and_data(tmp_path_factory.mktemp("moe"), samples=(EN_SAMPLE,), num_hidden_layers=1)
    _tiny("mixtral", vocab=8002, router_aux_loss_coef=0.02).save_pretrained(base / "mixtral")
    return base


def _config(base: Path, run: Path, steps: int) -> Path:
    data = [{"path": str(base / "data/en_sample_text_document")}]
    cfg = {"run_dir": str(run), "model": {"hf_path": str(base / "mixtral"), "tokenizer": str(base / "model")},
           "data": {"blend": data, "validation": {"en": data}, "seq_length": 32, "num_workers": 0},
           "train": {"global_batch_size": 4, "micro_batch_size": 2, "max_steps": steps, "loss_chunk_tokens": 16},
           "optim": {"lr": 3e-3, "min_lr": 3e-4}, "schedule": {"warmup_steps": 1},
           "checkpoint": {"interval": 0, "save_at_end": False}, "eval": {"interval": 0, "batches": 1},
           "logging": {"interval": 1, "tensorboard": False}}
    path = run.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(cfg))
    return path


# one thread: the tiny model's ops are too small to share, and on a busy 2-core machine threads mostly wait
_ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def _records(run: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def test_training_logs_the_router_loss_apart(moe_setup, tmp_path):
    """Through the real trainer (FSDP2, the chunked loss, 2 micro batches a step): each train record has
    router_aux_loss, the first step's being the mean of transformers' aux_loss over its micro batches, and loss the
    plain LM loss; model.router_aux_loss_coef=0 trains without it (same first-step loss, other weights after)."""
    run, off = tmp_path / "run", tmp_path / "off"
    out = keizoku("train", _config(moe_setup, run, 2), env=_ONE_THREAD).stdout
    assert "the loss includes its router load-balancing loss × 0.02" in out
    train = _records(run, "train")
    assert [r["step"] for r in train] == [1, 2] and all(r["router_aux_loss"] > 0 for r in train)
    assert "router_aux_loss" not in _records(run, "eval")[0] and "en_loss" in _records(run, "eval")[0]

    # the first global batch, as the trainer read it: transformers on each micro batch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from keizoku.config import load_config
    from keizoku.data import blend

    cfg = load_config(run / "config.yaml")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        ds, _ = blend.build(cfg.data, seq_length=32, train_samples=8, eval_samples=2,
                            tokenizer=blend.MegatronTokenizerShim(8001, 8002, "x"), cache_dir=tmp_path / "cache")
    finally:
        dist.destroy_process_group()
    model = AutoModelForCausalLM.from_pretrained(moe_setup / "mixtral")
    lm, aux = [], []
    with torch.no_grad():
        for first in (0, 2):
            tokens = torch.stack([torch.as_tensor(ds[i]["tokens"]) for i in (first, first + 1)])
            labels = torch.stack([torch.as_tensor(ds[i]["labels"]) for i in (first, first + 1)])
            lm_sum, micro_aux = CausalLMWithLoss(model, 0, router_aux=True)(tokens, labels)
            lm.append(lm_sum.item() / labels.numel())
            aux.append(micro_aux.item())
    assert train[0]["loss"] == pytest.approx(sum(lm) / 2, rel=1e-5)
    assert train[0]["router_aux_loss"] == pytest.approx(sum(aux) / 2, rel=1e-5)

    keizoku("train", _config(moe_setup, off, 2), "model.router_aux_loss_coef=0", "eval.at_start=false",
            env=_ONE_THREAD)
    train_off = _records(off, "train")
    assert all("router_aux_loss" not in r for r in train_off)
    assert train_off[0]["loss"] == pytest.approx(train[0]["loss"], rel=1e-6)
    assert train_off[1]["loss"] != pytest.approx(train[1]["loss"], rel=1e-7)  # the aux loss moved the weights


def test_a_dense_model_refuses_the_setting(moe_setup, tmp_path):
    proc = keizoku("train", _config(moe_setup, tmp_path / "run", 1), f"model.hf_path={moe_setup / 'model'}",
                   "model.router_aux_loss_coef=0.01", check=False, env=_ONE_THREAD)
    # refused by the checks before anything is written (keizoku.preflight, as `keizoku config check` runs them)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "model.router_aux_loss_coef: 0.01 is set, but this model has no router load-balancing loss" in proc.stderr
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_engine_megatron_translates_the_setting(tmp_path):
    """Megatron-Core computes its own load-balancing loss: the setting is its moe_aux_loss_coeff, a field of every
    supported Bridge release's provider; unset, the provider keeps the coefficient its bridge chose."""
    from keizoku.engines.megatron import plan as P

    fields = json.loads((Path(__file__).parent / "assets/megatron/bridge-fields.json").read_text())
    assert all("moe_aux_loss_coeff" in r["classes"]["GPTModelProvider"] for r in fields.values())
    cfg = KeizokuConfig(engine="megatron", run_dir=str(tmp_path / "run"))
    cfg.model.hf_path, cfg.data.mock, cfg.train.max_steps = str(tmp_path / "model"), True, 10
    kw = dict(release="0.6", world_size=1, train_blend=None, valid_blend=None, pretrained_checkpoint=None)
    assert "moe_aux_loss_coeff" not in P.plan_megatron(cfg, **kw)["model"]
    cfg.model.router_aux_loss_coef = 0.02
    assert P.plan_megatron(cfg, **kw)["model"]["moe_aux_loss_coeff"] == 0.02
