"""Make a tiny Llama-shaped Hugging Face model to try `keizoku train` on a CPU (examples/tiny_cpu.yaml).

Random weights saved as a pretrained checkpoint, with keizoku's bundled 8k tokenizer. Not a language model:
it exists so that the whole pipeline runs in seconds on a laptop.

    .venv/bin/python tools/make_tiny_model.py quickstart-out/tiny-llama
"""

import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

TOKENIZER = Path(__file__).resolve().parents[1] / "src" / "keizoku" / "assets" / "tokenizer"


def main(out: str) -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=8002, hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=8000, eos_token_id=8001))
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER / name, Path(out) / name)
    print(f"wrote {out} ({sum(p.numel() for p in model.parameters()):,} parameters)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "quickstart-out/tiny-llama")
