"""Loading the model to continue from: its pretrained weights, or random weights only when asked.

Megatron-Bridge's recipes silently train from random weights (Megatron-Bridge issue #1419); keizoku loads
``model.hf_path`` with ``AutoModelForCausalLM.from_pretrained`` and refuses a checkpoint whose weights do not
cover the model (transformers would initialise the missing tensors at random and only warn).
"""

from __future__ import annotations

import torch

from keizoku.config import ModelConfig


class ModelLoadError(ValueError):
    """The model cannot be loaded as configured; the message names the config key."""


def load_model(cfg: ModelConfig, dtype: torch.dtype = torch.float32, seed: int = 1234,
               device: torch.device | str = "cpu") -> torch.nn.Module:
    """The causal LM of ``cfg.hf_path`` in ``dtype`` (fp32 master weights by default): pretrained weights are read
    on the CPU; random ones (``init: random``) are drawn on ``device`` (an 8B model in seconds on a GPU, minutes
    on a CPU). The caller moves the model to its device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if not cfg.hf_path:
        raise ModelLoadError("model.hf_path: required — the Hugging Face model to continue from")
    import transformers

    common = dict(trust_remote_code=cfg.trust_remote_code)
    dtype_key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    try:
        if cfg.init == "random":
            config = AutoConfig.from_pretrained(cfg.hf_path, **common)
            config._attn_implementation = cfg.attn_implementation
            torch.manual_seed(seed)
            with torch.device(device):
                return AutoModelForCausalLM.from_config(config, **{dtype_key: dtype}, **common)
        model, info = AutoModelForCausalLM.from_pretrained(
            cfg.hf_path, attn_implementation=cfg.attn_implementation, output_loading_info=True,
            **{dtype_key: dtype}, **common)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"model.hf_path: cannot load {cfg.hf_path!r}: {e}") from e
    missing = sorted(info.get("missing_keys", []))  # tied weights are not reported missing
    if missing:
        shown = ", ".join(missing[:5]) + (" …" if len(missing) > 5 else "")
        raise ModelLoadError(
            f"model.hf_path: {cfg.hf_path} lacks {len(missing)} weight(s) of the model ({shown}); training would "
            "start them from random values. Fix the checkpoint, or set model.init: random to train from scratch.")
    return model

