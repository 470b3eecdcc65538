"""The plan (``plan.py``) made into Megatron-Bridge objects: the model provider and the ``ConfigContainer``.

Built from ``megatron.bridge.training.config``'s dataclasses directly — Bridge's recipe modules import
Transformer Engine and change their signatures between releases. The model provider comes from
``AutoBridge.from_hf_pretrained(hf_path).to_megatron_provider(...)`` (the architecture of the HF model; the HF
weights are read lazily, only when asked for) with keizoku's settings set on it. A field the installed release
lacks is an error naming it, never silently dropped.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from keizoku.engines.megatron import MegatronError
from keizoku.engines.megatron.plan import section_class


class BridgeError(MegatronError):
    """Megatron-Bridge cannot be used as configured; the message says why."""


def import_bridge():
    """``megatron.bridge``, or a BridgeError that says what is missing (Transformer Engine, most often)."""
    try:
        import megatron.bridge as bridge
    except ImportError as e:
        hint = (" — this Megatron-Bridge release imports Transformer Engine at start-up; run inside the NeMo "
                "container (docs/megatron.md)") if "transformer_engine" in str(e) else ""
        raise BridgeError(f"cannot import Megatron-Bridge: {e}{hint}") from e
    return bridge


def value(v: Any) -> Any:
    """Plan markers → objects: ``DTYPE:name`` a torch dtype, ``LAYER_SPEC:local`` Bridge's local layer spec."""
    if isinstance(v, str) and v.startswith("DTYPE:"):
        import torch

        return getattr(torch, v.split(":", 1)[1])
    if v == "LAYER_SPEC:local":
        from megatron.bridge.models.gpt_provider import local_layer_spec

        return local_layer_spec
    return v


def config_classes() -> dict[str, type]:
    """Bridge's config dataclasses by name, from the installed release."""
    import megatron.bridge.training.config as bc
    from megatron.bridge.models.gpt_provider import GPTModelProvider
    from megatron.bridge.training.tokenizers.config import TokenizerConfig

    names = ["ConfigContainer", "TrainingConfig", "ValidationConfig", "OptimizerConfig",
             "DistributedDataParallelConfig", "SchedulerConfig", "GPTDatasetConfig", "MockGPTDatasetConfig",
             "CheckpointConfig", "LoggerConfig", "RNGConfig", "DistributedInitConfig"]
    out = {n: getattr(bc, n) for n in names if hasattr(bc, n)}
    out["TokenizerConfig"] = TokenizerConfig
    out["GPTModelProvider"] = GPTModelProvider
    return out


def init_fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if f.init}


def hf_bridge(hf_path: str, trust_remote_code: bool):
    import_bridge()
    from megatron.bridge import AutoBridge

    try:
        return AutoBridge.from_hf_pretrained(str(hf_path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise BridgeError(f"model.hf_path: Megatron-Bridge cannot load {hf_path}: {e}") from e


def apply_to_provider(provider, settings: dict[str, Any]) -> None:
    """Set the plan's ``model`` section on the provider; a field it lacks is an error."""
    known = {f.name for f in dataclasses.fields(provider)}
    missing = sorted(set(settings) - known)
    if missing:
        raise BridgeError(f"{type(provider).__name__} of this Megatron-Bridge release has no field(s) "
                          f"{', '.join(missing)} (from keizoku's megatron settings / megatron.overrides)")
    for name, v in settings.items():
        setattr(provider, name, value(v))


def build(p: dict[str, dict[str, Any]], provider):
    """The ConfigContainer for ``pretrain``: provider (already made) + the plan's other sections."""
    classes = config_classes()
    apply_to_provider(provider, p["model"])
    parts: dict[str, Any] = {"model": provider}
    for section, values in p.items():
        if section in ("model", "container"):
            continue
        cls = classes.get(section_class(p, section))
        if cls is None:
            raise BridgeError(f"this Megatron-Bridge release has no {section_class(p, section)} "
                              f"(section {section!r})")
        unknown = sorted(set(values) - init_fields(cls))
        if unknown:
            raise BridgeError(f"{cls.__name__} of this Megatron-Bridge release has no field(s) "
                              f"{', '.join(unknown)} (section {section!r})")
        kwargs = {k: value(v) for k, v in values.items()}
        if "blend_per_split" in kwargs:  # Megatron-Core's (prefixes, weights) tuples
            kwargs["blend_per_split"] = [None if b is None else (b[0], b[1]) for b in kwargs["blend_per_split"]]
        parts[section] = cls(**kwargs)
    container = classes["ConfigContainer"]
    unknown = sorted(set(p.get("container", {})) - init_fields(container))
    if unknown:
        raise BridgeError(f"ConfigContainer of this Megatron-Bridge release has no field(s) {', '.join(unknown)}")
    parts.update({k: value(v) for k, v in p.get("container", {}).items()})
    return container(**parts)
