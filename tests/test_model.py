"""Pretrained weights are really loaded; random weights only when asked for."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from keizoku.config import ModelConfig
from keizoku.engines.torch.model import ModelLoadError, load_model


def tiny(kind: str, path, tie: bool = False):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[kind]
    config = cls(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=tie)
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    return model


@pytest.mark.parametrize("kind,tie", [("llama", False), ("qwen2", True), ("mistral", False)])
def test_pretrained_weights_are_loaded(tmp_path, kind, tie):
    ref = tiny(kind, tmp_path / "m", tie=tie)
    model = load_model(ModelConfig(hf_path=str(tmp_path / "m")))
    ids = torch.randint(0, 300, (2, 16))
    torch.testing.assert_close(model(ids).logits, ref(ids).logits)
    assert next(model.parameters()).dtype == torch.float32


def test_missing_weights_are_refused(tmp_path):
    tiny("llama", tmp_path / "m")
    weights = load_file(tmp_path / "m/model.safetensors")
    del weights["model.layers.1.mlp.down_proj.weight"]
    save_file(weights, tmp_path / "m/model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"model.hf_path: .* lacks 1 weight\(s\) .*model.layers.1.mlp.down_proj"):
        load_model(ModelConfig(hf_path=str(tmp_path / "m")))


def test_random_only_when_asked(tmp_path):
    ref = tiny("llama", tmp_path / "m")
    model = load_model(ModelConfig(hf_path=str(tmp_path / "m"), init="random"), seed=1)
    assert not torch.equal(model.model.embed_tokens.weight, ref.model.embed_tokens.weight)
    with pytest.raises(ModelLoadError, match=r"model.hf_path: cannot load"):
        load_model(ModelConfig(hf_path=str(tmp_path / "nothing-here")))
