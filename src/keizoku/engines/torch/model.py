"""The model to continue from — its pretrained weights, or random weights only when asked — and its FLOPs.

Megatron-Bridge's recipes silently train from random weights (Megatron-Bridge issue #1419); keizoku loads
``model.hf_path`` with ``AutoModelForCausalLM.from_pretrained`` and refuses a checkpoint whose weights do not
cover the model (transformers would initialise the missing tensors at random and only warn).

Attention (``model.attn_implementation``): ``auto`` leaves the choice to transformers — sdpa where the model
supports it, else eager (Gemma-2: sdpa cannot soft-cap its attention logits); a value the model cannot use is
refused naming the key and the value ``auto`` would take (``attention_refused``).
"""

from __future__ import annotations

import copy

import torch

from keizoku.config import ModelConfig
from keizoku.errors import KeizokuError
from keizoku.hf import dtype_kwargs, load_causal_lm


class ModelLoadError(KeizokuError, ValueError):
    """The model cannot be loaded as configured; the message names the config key."""


def load_model(cfg: ModelConfig, dtype: torch.dtype = torch.float32, seed: int = 1234,
               device: torch.device | str = "cpu") -> torch.nn.Module:
    """The causal LM of ``cfg.hf_path`` in ``dtype`` (fp32 master weights by default): pretrained weights are read
    on the CPU; random ones (``init: random``) are drawn on ``device`` (an 8B model in seconds on a GPU, minutes
    on a CPU). The caller moves the model to its device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if not cfg.hf_path:
        raise ModelLoadError("model.hf_path: required — the Hugging Face model to continue from")
    common = dict(trust_remote_code=cfg.trust_remote_code)
    try:
        config = AutoConfig.from_pretrained(cfg.hf_path, **common)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"model.hf_path: cannot load {cfg.hf_path!r}: {_one_line(e)}") from e
    _check_attention(cfg, config)
    try:
        if cfg.init == "random":
            config._attn_implementation = attn_implementation(cfg)
            torch.manual_seed(seed)
            with torch.device(device):
                return AutoModelForCausalLM.from_config(config, **dtype_kwargs(dtype), **common)
        model, info = load_causal_lm(cfg.hf_path, dtype, attn_implementation=attn_implementation(cfg),
                                     output_loading_info=True, **common)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"model.hf_path: cannot load {cfg.hf_path!r}: {_one_line(e)}") from e
    missing = sorted(info.get("missing_keys", []))  # tied weights are not reported missing
    if missing:
        shown = ", ".join(missing[:5]) + (" …" if len(missing) > 5 else "")
        raise ModelLoadError(
            f"model.hf_path: {cfg.hf_path} lacks {len(missing)} weight(s) of the model ({shown}); training would "
            "start them from random values. Fix the checkpoint, or set model.init: random to train from scratch.")
    return model


def model_skeleton(cfg: ModelConfig, config_dir: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The architecture of the model in ``config_dir`` on the meta device: no memory, no initialisation
    (``weights`` fills it once it is sharded)."""
    from transformers import AutoConfig

    if not config_dir:
        raise ModelLoadError("model.hf_path: required — the Hugging Face model to continue from")
    try:
        config = AutoConfig.from_pretrained(config_dir, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"model.hf_path: cannot load {config_dir!r}: {_one_line(e)}") from e
    _check_attention(cfg, config)
    try:
        return _on_meta(config, attn_implementation(cfg), cfg.trust_remote_code, dtype)
    except (ValueError, ImportError) as e:
        raise ModelLoadError(f"model.hf_path: transformers cannot build the model of {config_dir}: "
                             f"{_one_line(e)}") from e


def attn_implementation(cfg: ModelConfig) -> str | None:
    """``model.attn_implementation`` as transformers takes it: None for auto (transformers chooses: sdpa where the
    model supports it, else eager)."""
    return None if cfg.attn_implementation == "auto" else cfg.attn_implementation


def _on_meta(config, attention: str | None, trust_remote_code: bool, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    config._attn_implementation = attention
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, **dtype_kwargs(dtype), trust_remote_code=trust_remote_code)


def _check_attention(cfg: ModelConfig, config) -> None:
    """A ModelLoadError naming model.attn_implementation when the model cannot use the one asked for but builds with
    auto (transformers checks it as it builds the model: here on the meta device, which costs nothing)."""
    asked = attn_implementation(cfg)
    if asked is None:
        return
    try:
        _on_meta(copy.deepcopy(config), asked, cfg.trust_remote_code)
        return
    except (ValueError, ImportError, OSError, RuntimeError) as e:
        why = _one_line(e)
    try:
        model = _on_meta(copy.deepcopy(config), None, cfg.trust_remote_code)
    except Exception:  # noqa: BLE001 - the model does not build whatever its attention: not the key's fault
        return
    raise attention_refused(cfg, type(model).__name__, model.config._attn_implementation, why)


def attention_refused(cfg: ModelConfig, model_class: str, chosen: str, why: str) -> ModelLoadError:
    """The error for an attention implementation the model cannot use: the key, the value, and the one to use
    (``chosen``: what auto takes for the model)."""
    return ModelLoadError(f"model.attn_implementation: {cfg.attn_implementation!r}: {model_class} cannot use it "
                          f"(transformers: {_first_sentence(why)}); set model.attn_implementation: {chosen}, or auto "
                          f"(the model's own choice: {chosen} here)")


def _first_sentence(text: str, limit: int = 300) -> str:
    end = text.find(". ")
    text = text if end < 0 else text[:end + 1]
    return text if len(text) <= limit else text[:limit] + "…"


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The Hugging Face model's decoder layers (``model.layers``, or ``transformer.h`` for GPT-2 style models)."""
    base = getattr(model, model.base_model_prefix, model)
    layers = getattr(base, "layers", None) or getattr(base, "h", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ModelLoadError(f"model.hf_path: {type(model).__name__}: cannot find its decoder layers to shard")
    return layers


# dense BF16 peak per GPU, TFLOP/s (MFU's denominator)
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "H800": 989.4, "A100": 312.0, "A800": 312.0, "GH200": 989.4}


def flops_per_token(model: torch.nn.Module, seq_length: int) -> float:
    """Training FLOPs per token: 6·N + 12·L·H·S (N: parameters except the input embedding, output layer
    included; L layers, H hidden size, S sequence length; the second term is attention)."""
    cfg = model.config
    embed = model.get_input_embeddings().weight
    n = sum(p.numel() for p in model.parameters()) - embed.numel()
    if getattr(cfg, "tie_word_embeddings", False):
        n += embed.numel()  # the tied output layer still does its matmul
    return 6 * n + 12 * cfg.num_hidden_layers * cfg.hidden_size * seq_length


def peak_flops(device: torch.device) -> float | None:
    """The device's dense BF16 peak in FLOP/s, where known (GPUs keizoku has a figure for)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tf * 1e12 for key, tf in PEAK_BF16_TFLOPS.items() if key in name), None)
