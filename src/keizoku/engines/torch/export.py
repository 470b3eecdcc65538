"""engine: torch's ``keizoku export``: a training checkpoint → a Hugging Face model directory (safetensors).

One copy of the model is in memory at a time: the base model (``model.hf_path``) is loaded, the
checkpoint's tensors are read into it in place (torch.distributed.checkpoint, no process group needed), the
logits of a few probe sequences are kept, and the model is written with ``save_pretrained`` (sharded
safetensors) beside the tokenizer. Verification then loads the export with ``AutoModelForCausalLM`` and
compares its logits with those kept.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from keizoku.config import load_config
from keizoku.engines import ExportError, checkpoint_to_export
from keizoku.engines.torch.checkpoint import read_trainer_state
from keizoku.hf import load_causal_lm
from keizoku.rundir import EXPORT_RECORD, RunDir, discard, publish, staging_path


def export(run_dir: Path, out: Path, step: int | None = None, verify: bool = True, log=print) -> dict:
    from transformers import AutoTokenizer

    run_dir, out = Path(run_dir), Path(out)
    cfg = load_config(RunDir(run_dir).config)
    path = checkpoint_to_export(run_dir, step, "torch").path
    model = _model_from_checkpoint(cfg, path)
    probe = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids=probe).logits

    staged = staging_path(out)
    discard(staged)
    model.save_pretrained(staged, safe_serialization=True)
    del model
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer or cfg.model.hf_path,
                                              trust_remote_code=cfg.model.trust_remote_code)
    tokenizer.save_pretrained(staged)
    trainer_state = read_trainer_state(path)
    info = {"run_dir": str(run_dir.absolute()), "checkpoint": path.name, "step": trainer_state["step"],
            "consumed_tokens": trainer_state["consumed_tokens"], "base_model": cfg.model.hf_path}
    (staged / EXPORT_RECORD).write_text(json.dumps(info, indent=1) + "\n")
    publish(staged, out, replace=True)
    log(f"exported {path} (step {info['step']}) to {out}")
    if verify:
        info["max_logit_diff"] = _verify(out, probe, expected)
        log(f"verified: the export reproduces the checkpoint's logits (max difference {info['max_logit_diff']:.3g})")
    return info


def _model_from_checkpoint(cfg, path: Path) -> torch.nn.Module:
    """The base model (``model.hf_path``) with the checkpoint's weights: it gives the architecture with every buffer
    set up (rotary tables are not in the checkpoint); its weights are overwritten in place by the checkpoint's."""
    import torch.distributed.checkpoint as dcp

    from keizoku.engines.torch.model import load_model

    model = load_model(cfg.model, torch.float32)
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=str(path), no_dist=True)  # in place, into model's own tensors
    model.load_state_dict(state["model"])
    model.tie_weights()
    return model.eval()


def _verify(out: Path, probe: torch.Tensor, expected: torch.Tensor) -> float:
    """The export, reloaded by transformers, must give the checkpoint's logits; returns the largest difference."""
    reloaded = load_causal_lm(out, torch.float32)
    with torch.no_grad():
        got = reloaded(input_ids=probe).logits
    diff = (got - expected).abs().max().item()
    if diff > 1e-5:
        raise ExportError(f"{out}: the exported model's logits differ from the checkpoint's by {diff:.3g}")
    return diff
