"""Hugging Face transformers across its releases: what keizoku calls differently on 4.x and 5.x."""

from __future__ import annotations

import re
from collections import defaultdict


def major_version() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


def dtype_kwargs(dtype) -> dict:
    """``from_pretrained`` / ``from_config``'s dtype argument: ``dtype`` from transformers 5, ``torch_dtype`` before."""
    return {"dtype" if major_version() >= 5 else "torch_dtype": dtype}


def load_causal_lm(path, dtype, **kwargs):
    """``AutoModelForCausalLM.from_pretrained(path)`` in ``dtype``."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, **dtype_kwargs(dtype), **kwargs)


def config_dtype(config: dict) -> str | None:
    """The dtype a config.json names ("bfloat16", …): its ``dtype`` (transformers 5) or ``torch_dtype`` (before)."""
    return config.get("dtype") or config.get("torch_dtype")


def set_config_dtype(config, dtype) -> None:
    """Make ``config`` (a ``PretrainedConfig``) name ``dtype`` when saved, as ``save_pretrained`` does."""
    setattr(config, "dtype" if major_version() >= 5 else "torch_dtype", str(dtype).removeprefix("torch."))


def tied_names(model) -> set[str]:
    """The state-dict names that ``save_pretrained`` leaves out: of parameters tied together (one tensor under
    several names, e.g. a tied output layer), all but one of the names the model declares tied
    (``_tied_weights_keys``: a list in 4.x, {target: source} in 5.x; both releases choose so). Works on meta."""
    names_of = defaultdict(list)
    for name, param in model.named_parameters(remove_duplicate=False):
        names_of[id(param)].append(name)
    declared = [f"{prefix}.{key}" if prefix else key for prefix, module in model.named_modules()
                for key in (getattr(module, "_tied_weights_keys", None) or [])]
    left_out = set()
    for names in names_of.values():
        tied = [n for n in sorted(names) if any(re.search(pattern, n) for pattern in declared)]
        left_out.update(tied[:len(names) - 1])
    return left_out


def saved_form(model, state: dict) -> dict:
    """``state`` (tensors of ``model``'s state dict, each decoder layer whole; meta tensors too) named, shaped and
    ordered as ``save_pretrained`` writes them: transformers 5 reverts the conversions it applies at load (Mixtral's
    experts, merged into one tensor in memory, are written one tensor per expert); 4.x writes the state as it is."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        return dict(state)
    return dict(revert_weight_conversion(model, dict(state)))
