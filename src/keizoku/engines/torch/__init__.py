"""engine: torch — continual pre-training of the Hugging Face model itself, with FSDP2, in keizoku's own loop.

``trainer`` (the loop: build, train_step, evaluate, save) · ``parallel`` (process group, device, FSDP2) · ``model``
(the model to continue from, its FLOPs) · ``loss`` (the chunked LM loss) · ``optim`` (AdamW, bf16 moments) ·
``checkpoint`` (DCP save and restore) · ``recompute`` (activation checkpointing) · ``float8`` (FP8 matmuls) ·
``profiling`` (one step under torch.profiler) · ``export`` (a checkpoint → Hugging Face safetensors).

Entry points (``keizoku.engines.ENGINES``): ``trainer.train`` and ``export.export``; no import step (the engine
reads HF checkpoints itself).
"""

from __future__ import annotations

from keizoku.errors import KeizokuError


class TrainingError(KeizokuError, RuntimeError):
    """engine: torch cannot go on; the message says why and names the setting at fault."""
