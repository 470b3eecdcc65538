"""Hugging Face transformers across its releases: what keizoku calls differently on 4.x and 5.x."""

from __future__ import annotations


def dtype_kwargs(dtype) -> dict:
    """``from_pretrained`` / ``from_config``'s dtype argument: ``dtype`` from transformers 5, ``torch_dtype`` before."""
    import transformers

    return {"dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype": dtype}


def load_causal_lm(path, dtype, **kwargs):
    """``AutoModelForCausalLM.from_pretrained(path)`` in ``dtype``."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, **dtype_kwargs(dtype), **kwargs)
