"""Loading a pretrained model for training: the whole model per rank (before) vs this rank's shard (sharded loading).

  python3 bench/scale/load_model.py --shape 8b --work /tmp/lm --out $OUT            # write, then both, one GPU
  torchrun --nproc-per-node 2 bench/scale/load_model.py --shape 8b --work /tmp/lm --variant sharded --no-write

``--write`` (default once, skipped when the checkpoint is there) saves a Llama-shaped model of ``--shape`` with
random weights in bf16 as a real Hugging Face checkpoint (safetensors shards of 5 GB, config.json) — what
``model.hf_path`` points at. Then each variant runs in its own process (``--variant`` runs one, in this process):

- ``whole``: what engine torch did before: ``AutoModelForCausalLM.from_pretrained`` in fp32 on the CPU in every
  rank, moved to the rank's GPU, then FSDP2 (``keizoku.engines.torch.model.load_model`` + ``parallel.shard``);
- ``sharded``: skeleton on the meta device, FSDP2, each rank's shards allocated on its GPU and filled from its
  slices of the safetensors files (``keizoku.engines.torch.weights``).

Reported per rank: wall seconds, peak host RSS (ru_maxrss), peak GPU memory allocated, bytes read (sharded), and a
checksum of one weight so that both variants can be seen to load the same values.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import llama_config  # noqa: E402


def write_checkpoint(model_dir: Path, shape: str) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(llama_config(shape, 8192), dtype=torch.bfloat16)
    model.save_pretrained(model_dir, max_shard_size="5GB")
    del model
    return time.perf_counter() - start


def load(variant: str, model_dir: Path) -> dict:
    import torch
    import torch.distributed as dist

    from keizoku.config import KeizokuConfig, ModelConfig
    from keizoku.engines.torch import parallel, weights
    from keizoku.engines.torch.loss import CausalLMWithLoss
    from keizoku.engines.torch.model import load_model, model_skeleton

    cfg = KeizokuConfig(model=ModelConfig(hf_path=str(model_dir)))
    d = parallel.setup_distributed(cfg)
    if d.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(d.device)
    start = time.perf_counter()
    report = None
    if variant == "whole":
        model = load_model(cfg.model, torch.float32).to(d.device)
        parallel.shard(CausalLMWithLoss(model, 0), cfg, d, bf16=True, compile=False, reshard=d.world > 1)
    else:
        model = model_skeleton(cfg.model, str(model_dir))
        lm = CausalLMWithLoss(model, 0)
        parallel.shard(lm, cfg, d, bf16=True, compile=False, reshard=d.world > 1)
        weights.materialize(lm, d.device)
        report = weights.load_pretrained(model, str(model_dir))
        weights.init_buffers(model, parameters_filled=True)
    if d.device.type == "cuda":
        torch.cuda.synchronize(d.device)
    seconds = time.perf_counter() - start
    w = model.get_input_embeddings().weight
    local = w.to_local() if hasattr(w, "to_local") else w
    out = {"variant": variant, "rank": d.rank, "world": d.world, "seconds": round(seconds, 1),
           "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
           "peak_gpu_gib": round(torch.cuda.max_memory_allocated(d.device) / 2**30, 2) if d.device.type == "cuda"
           else None,
           "embed_checksum": float(local.double().sum()) if d.world == 1 else None}
    if report is not None:
        out.update(read_gib=round(report.bytes_read / 2**30, 2), model_gib=round(report.bytes_total / 2**30, 2))
    dist.destroy_process_group()
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="8b")
    p.add_argument("--work", type=Path, default=Path("/tmp/load-bench"))
    p.add_argument("--variant", choices=["whole", "sharded"], help="run one variant in this process")
    p.add_argument("--variants", nargs="+", default=["whole", "sharded"])
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    model_dir = a.work / f"llama-{a.shape}"
    if a.variant:
        print(json.dumps(load(a.variant, model_dir)), flush=True)
        return
    rows = []
    if not a.no_write and not (model_dir / "config.json").exists():
        rows.append({"write_seconds": round(write_checkpoint(model_dir, a.shape), 1),
                     "checkpoint_gib": round(sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) / 2**30, 2)})
        print(json.dumps(rows[-1]), flush=True)
    for variant in a.variants:
        proc = subprocess.run([sys.executable, __file__, "--shape", a.shape, "--work", str(a.work), "--variant", variant],
                              capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        rows.append(json.loads(lines[-1]) if proc.returncode == 0 and lines else
                    {"variant": variant, "error": proc.stderr[-2000:]})
        print(json.dumps(rows[-1]), flush=True)
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / f"load-{a.shape}.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
