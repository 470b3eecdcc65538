"""``keizoku export`` for megatron runs: a Megatron checkpoint → a Hugging Face model directory.

Bridge's ``AutoBridge.export_ckpt`` rebuilds the model from the ``run_config.yaml`` inside the checkpoint; keizoku
rebuilds it from what the run recorded instead — ``RUN_DIR/config.yaml`` (model.hf_path, megatron settings) and
``RUN_DIR/megatron.json`` (the base model's fingerprint, the Bridge release) — so an export does not depend on
Bridge being able to re-instantiate its own serialized config. Steps, in one single-process gloo context on the
CPU: provider from the HF config (tensor/pipeline parallel 1, the run's layer implementation and dtype) →
Bridge's ``build_and_load_model`` reads the checkpoint's weights → ``save_hf_pretrained`` writes safetensors,
config and tokenizer under a temporary name, renamed when complete.

Verification: the export is reloaded with ``AutoModelForCausalLM`` and must hold, bit for bit, every tensor that
Bridge's conversion of the checkpoint yields; where a CUDA GPU is present, the Megatron model's logits on probe
sequences must also match the reloaded HF model's (fp32 runs: max difference ≤ 1e-4 of the logits' scale; bf16:
≤ 2e-2), which checks the conversion itself, not only the file.
"""

from __future__ import annotations

import json
from pathlib import Path

from keizoku.config import load_config
from keizoku.engines import checkpoint_to_export
from keizoku.engines.megatron import MegatronError
from keizoku.hf import load_causal_lm
from keizoku.rundir import EXPORT_RECORD, RunDir, discard, publish, staging_path


class MegatronExportError(MegatronError):
    pass


def export(run_dir: Path, out: Path, step: int | None = None, verify: bool = True, log=print, dtype: str = "auto",
           verify_logits: bool | None = None) -> dict:
    """``dtype``: only auto (what Bridge writes); ``verify_logits``: None or True compare the logits where a CUDA
    GPU is present, False never."""
    import torch

    if dtype != "auto":
        raise MegatronExportError(f"--dtype {dtype}: engine megatron exports in the dtype Megatron-Bridge writes "
                                  "(leave --dtype out)")

    from keizoku.engines.megatron import versions
    from keizoku.engines.megatron.container import apply_to_provider, hf_bridge
    from keizoku.engines.megatron.importer import fingerprint
    from keizoku.engines.megatron.plan import impl_settings

    run_dir, out = Path(run_dir), Path(out)
    cfg = load_config(RunDir(run_dir).config)
    info_path = RunDir(run_dir).megatron_info
    if not info_path.is_file():
        raise MegatronExportError(f"{info_path}: missing — not a keizoku megatron run directory")
    info = json.loads(info_path.read_text())
    found = versions.detect()
    saved = checkpoint_to_export(run_dir, step, "megatron")
    path, step = saved.path, saved.step
    hf_path = cfg.model.hf_path
    if fingerprint(hf_path) != info["hf_fingerprint"]:
        raise MegatronExportError(f"model.hf_path: {hf_path} is not the checkpoint this run was trained from "
                                  "(its fingerprint changed); the export takes its architecture and tokenizer "
                                  "from that base model")

    from megatron.bridge.training.model_load_save import build_and_load_model, temporary_distributed_context

    fp32 = cfg.model.dtype == "fp32"
    dtype = torch.float32 if fp32 else torch.bfloat16
    staged = staging_path(out)
    discard(staged)
    result = {"run_dir": str(run_dir.absolute()), "checkpoint": path.name, "step": step, "base_model": hf_path,
              "engine": "megatron", "bridge": str(found)}
    with temporary_distributed_context(backend="gloo"):
        bridge = hf_bridge(hf_path, cfg.model.trust_remote_code)
        provider = bridge.to_megatron_provider(load_weights=False)
        apply_to_provider(provider, {**impl_settings(cfg.megatron.transformer_impl),
                                     "tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1,
                                     "virtual_pipeline_model_parallel_size": None, "context_parallel_size": 1,
                                     "sequence_parallel": False, "expert_model_parallel_size": 1,
                                     "bf16": not fp32, "fp16": False, "params_dtype": dtype,
                                     "perform_initialization": False})
        model = build_and_load_model(str(path), provider, use_cpu_init=True, skip_temp_dist_context=True)
        model = model if isinstance(model, list) else [model]
        bridge.save_hf_pretrained(model, str(staged), show_progress=False)
        if cfg.model.tokenizer:
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(cfg.model.tokenizer, trust_remote_code=cfg.model.trust_remote_code) \
                .save_pretrained(staged)
        (staged / EXPORT_RECORD).write_text(json.dumps(result, indent=1) + "\n")
        publish(staged, out, replace=True)
        log(f"exported {path} (step {step}) to {out}")
        if verify:
            result.update(_verify(bridge, model, out, fp32, log, logits=verify_logits is not False))
    return result


def _verify(bridge, model, out: Path, fp32: bool, log, logits: bool) -> dict:
    import torch

    hf = load_causal_lm(out, torch.float32)
    saved = hf.state_dict()
    converted = 0
    for name, tensor in bridge.export_hf_weights(model, cpu=True, show_progress=False):
        if name not in saved:
            raise MegatronExportError(f"{out}: the export lacks {name}")
        if not torch.equal(saved[name].float(), tensor.float()):
            raise MegatronExportError(f"{out}: {name} differs from the checkpoint's converted weight")
        converted += 1
    log(f"verified: the export holds every converted tensor of the checkpoint ({converted} tensors)")
    report = {"verified_tensors": converted}
    if not logits:
        return report
    if not torch.cuda.is_available():
        log("note: no CUDA GPU here, so the Megatron model's logits were not compared (Megatron-Core's forward "
            "pass needs CUDA); the tensors were")
        return report
    diff, scale = logits_difference(model[0], hf)
    limit = (1e-4 if fp32 else 2e-2) * scale
    report.update(max_logit_diff=diff, logit_scale=scale)
    if diff > limit:
        raise MegatronExportError(f"{out}: the exported model's logits differ from the Megatron checkpoint's by "
                                  f"{diff:.3g} (scale {scale:.3g})")
    log(f"verified: the export reproduces the Megatron model's logits (max difference {diff:.3g}, scale {scale:.3g})")
    return report


def logits_difference(megatron_model, hf_model, seq: int = 32) -> tuple[float, float]:
    """(max |Megatron − HF| logits, max |HF logits|) on two random probe sequences, on the GPU."""
    import torch

    vocab = hf_model.config.vocab_size
    probe = torch.randint(0, vocab, (2, seq), generator=torch.Generator().manual_seed(0)).cuda()
    position_ids = torch.arange(seq, device="cuda").unsqueeze(0).expand_as(probe)
    megatron_model.cuda().eval()
    hf_model.cuda().eval()
    with torch.no_grad():
        got = megatron_model(input_ids=probe, position_ids=position_ids, attention_mask=None)[..., :vocab].float()
        want = hf_model(input_ids=probe).logits.float()
    return (got - want).abs().max().item(), want.abs().max().item()
