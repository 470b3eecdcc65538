"""``keizoku export``: a training checkpoint → a Hugging Face model directory (safetensors).

One copy of the model is in memory at a time: the base model (``model.hf_path``) is loaded, the
checkpoint's tensors are read into it in place (torch.distributed.checkpoint, no process group needed), the
logits of a few probe sequences are kept, and the model is written with ``save_pretrained`` (sharded
safetensors) beside the tokenizer. Verification then loads the export with ``AutoModelForCausalLM`` and
compares its logits with those kept.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from keizoku.config import load
from keizoku.train import checkpoint as ckpt


class ExportError(ValueError):
    pass


def find_checkpoint(run_dir: Path, step: int | None) -> Path:
    root = run_dir / "checkpoints"
    if step is None:
        found = ckpt.latest(root)
        if found is None:
            raise ExportError(f"{run_dir}: no complete checkpoint in {root}")
        return found
    path = root / f"step_{step:08d}"
    if not (path / ckpt.STATE_FILE).exists():
        raise ExportError(f"{path}: no complete checkpoint for step {step}")
    return path


def export(run_dir: Path, out: Path, step: int | None = None, verify: bool = True, log=print) -> dict:
    import torch.distributed.checkpoint as dcp
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from keizoku.train.model import load_model

    run_dir, out = Path(run_dir), Path(out)
    cfg = load(run_dir / "config.yaml")
    path = find_checkpoint(run_dir, step)
    # the base model gives the architecture with every buffer set up (rotary tables are not in the checkpoint);
    # its weights are then overwritten in place by the checkpoint's
    model = load_model(cfg.model, torch.float32)
    config = model.config
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=str(path), no_dist=True)  # in place, into model's own tensors
    model.load_state_dict(state["model"])
    model.tie_weights()
    model.eval()

    probe = torch.randint(0, config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids=probe).logits

    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    del model, state
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer or cfg.model.hf_path,
                                              trust_remote_code=cfg.model.trust_remote_code)
    tokenizer.save_pretrained(tmp)
    trainer_state = json.loads((path / ckpt.STATE_FILE).read_text())
    info = {"run_dir": str(run_dir.absolute()), "checkpoint": path.name, "step": trainer_state["step"],
            "consumed_tokens": trainer_state["consumed_tokens"], "base_model": cfg.model.hf_path}
    (tmp / "keizoku_export.json").write_text(json.dumps(info, indent=1) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    log(f"exported {path} (step {info['step']}) to {out}")
    if verify:
        reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32) if _v5() else \
            AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32)
        with torch.no_grad():
            got = reloaded(input_ids=probe).logits
        diff = (got - expected).abs().max().item()
        if diff > 1e-5:
            raise ExportError(f"{out}: the exported model's logits differ from the checkpoint's by {diff:.3g}")
        info["max_logit_diff"] = diff
        log(f"verified: the export reproduces the checkpoint's logits (max difference {diff:.3g})")
    return info


def _v5() -> bool:
    import transformers

    return int(transformers.__version__.split(".")[0]) >= 5
