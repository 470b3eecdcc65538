"""Sharded loading (engines/torch/weights.py): each rank reads and holds only its shard of the pretrained weights,
which equal what transformers loads; random initialisation per shard gives the same weights for any number of
ranks; buffers no checkpoint holds are the model's own."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SHAPE = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)

# One run of the real loading path: skeleton on meta → FSDP2 → each rank's shards filled; rank 0 writes the full
# weights, buffers and the loss on a probe sequence, every rank its bytes read.
SCRIPT = r"""
import json, os, sys
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from keizoku.config import KeizokuConfig, ModelConfig
from keizoku.engines.torch import parallel, weights
from keizoku.engines.torch.loss import CausalLMWithLoss
from keizoku.engines.torch.model import model_skeleton

path, out, init = sys.argv[1], sys.argv[2], sys.argv[3]
cfg = KeizokuConfig(model=ModelConfig(hf_path=path, attn_implementation="eager"))
cfg.train.device = "cpu"
d = parallel.setup_distributed(cfg)
model = model_skeleton(cfg.model, path)
assert weights.unsupported(model, None if init == "random" else path, False) is None
lm = CausalLMWithLoss(model, 0)
parallel.shard(lm, cfg, d, bf16=False, compile=False, reshard=True)
weights.materialize(lm, d.device)
report = None
if init == "random":
    weights.init_random(model, 7, d.device)
else:
    report = weights.load_pretrained(model, path)
weights.init_buffers(model, parameters_filled=True)
full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
probe = torch.randint(0, model.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
with torch.no_grad():  # through the FSDP root, as training runs it: the summed token loss
    loss = lm(probe[:, :-1], probe[:, 1:])
if d.rank == 0:
    torch.save({"weights": full, "buffers": {k: v.clone() for k, v in model.named_buffers()}, "loss": loss}, out)
with open(f"{out}.rank{d.rank}.json", "w") as f:  # a file per rank: two ranks' prints may interleave on one pipe
    json.dump({"rank": d.rank, "read": report.bytes_read if report else 0, "total": report.bytes_total if report else 0}, f)
dist.destroy_process_group()
sys.stdout.flush()
os._exit(0)  # as keizoku's CLI leaves (cli.app.leave): gloo's C++ threads can abort the interpreter's teardown
"""


def run_loader(tmp_path: Path, model_dir: Path, nproc: int, init: str = "pretrained") -> tuple[dict, list[dict]]:
    script = tmp_path / "load.py"
    script.write_text(SCRIPT)
    out = tmp_path / f"loaded-{nproc}-{init}.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           str(script), str(model_dir), str(out), init] if nproc > 1 else \
        [sys.executable, str(script), str(model_dir), str(out), init]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    reports = [json.loads(Path(f"{out}.rank{rank}.json").read_text()) for rank in range(nproc)]
    return torch.load(out, weights_only=False), reports


def save_tiny(kind: str, path: Path, dtype=torch.float32) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config

    configs = {
        "llama": lambda: LlamaConfig(**SHAPE),
        "qwen2": lambda: Qwen2Config(**SHAPE, tie_word_embeddings=True),  # biases on q/k/v, tied output layer
        "mistral": lambda: MistralConfig(**SHAPE, sliding_window=8),
        "gemma3": lambda: Gemma3TextConfig(**SHAPE, head_dim=16),  # scaled embedding (a buffer), two rotary tables
    }
    torch.manual_seed(0)
    config = configs[kind]()
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    model.save_pretrained(path)
    return model


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral", "gemma3"])
def test_sharded_load_equals_transformers(tmp_path, kind):
    from transformers import AutoModelForCausalLM

    save_tiny(kind, tmp_path / "m")
    from keizoku.engines.torch.loss import full_lm_loss

    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32, attn_implementation="eager")
    expected = ref.state_dict()
    probe = torch.randint(0, SHAPE["vocab_size"], (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref_loss = full_lm_loss(ref(input_ids=probe[:, :-1]).logits, probe[:, 1:])
    for nproc in (1, 2):
        got, _ = run_loader(tmp_path, tmp_path / "m", nproc)
        for name, value in got["weights"].items():
            assert torch.equal(value, expected[name]), (kind, nproc, name)
        for name, value in got["buffers"].items():
            torch.testing.assert_close(value, dict(ref.named_buffers())[name], rtol=0, atol=0, msg=(kind, name))
        torch.testing.assert_close(got["loss"], ref_loss, rtol=1e-5, atol=1e-5)


def test_two_ranks_each_read_about_half_of_a_bf16_checkpoint(tmp_path):
    """bf16 on disk, fp32 in training: each rank reads its rows only, converted slice by slice."""
    from transformers import AutoModelForCausalLM

    save_tiny("llama", tmp_path / "m", dtype=torch.bfloat16)
    got, reports = run_loader(tmp_path, tmp_path / "m", 2)
    total = reports[0]["total"]
    assert total == sum(v.numel() * 2 for v in got["weights"].values())  # the model's bytes, as stored (bf16)
    for r in reports:
        assert 0.4 * total <= r["read"] <= 0.6 * total, r
    assert sum(r["read"] for r in reports) == total  # every byte read once, by one rank
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in got["weights"].items())


def test_random_init_is_the_same_for_any_number_of_ranks(tmp_path):
    save_tiny("qwen2", tmp_path / "m")
    one, _ = run_loader(tmp_path, tmp_path / "m", 1, init="random")
    two, _ = run_loader(tmp_path, tmp_path / "m", 2, init="random")
    for name, value in one["weights"].items():
        assert torch.equal(value, two["weights"][name]), name
    norms = [v for k, v in one["weights"].items() if k.endswith("norm.weight")]
    assert norms and all(torch.equal(v, torch.ones_like(v)) for v in norms)  # the model's own init: norms at 1
    assert one["weights"]["model.embed_tokens.weight"].std().item() == pytest.approx(0.02, rel=0.1)


def test_checkpoints_transformers_must_convert_are_loaded_whole(tmp_path):
    """transformers 5 merges a Mixtral checkpoint's per-expert tensors at load: not named as the model's
    parameters, so not loadable shard by shard; the trainer loads such models whole, as before (and says so)."""
    from transformers import AutoModelForCausalLM, MixtralConfig

    from keizoku.config import ModelConfig
    from keizoku.engines.torch import weights
    from keizoku.engines.torch.model import model_skeleton

    AutoModelForCausalLM.from_config(MixtralConfig(**SHAPE, num_local_experts=4, num_experts_per_tok=2)) \
        .save_pretrained(tmp_path / "moe")
    skeleton = model_skeleton(ModelConfig(hf_path=str(tmp_path / "moe")), str(tmp_path / "moe"))
    why = weights.unsupported(skeleton, str(tmp_path / "moe"), False)
    assert why and "not named as in" in why and "transformers converts them" in why
    assert weights.unsupported(skeleton, None, False) is None  # random init or a resume: no file to match
    assert "trust_remote_code" in weights.unsupported(skeleton, None, True)
