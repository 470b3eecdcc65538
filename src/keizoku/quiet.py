"""The libraries' start-up noise that says nothing to a keizoku user, silenced unless ``--verbose``.

Each entry is a known, harmless message (checked against the releases keizoku supports); anything else a library
says is still shown. Call ``silence_library_noise`` before the libraries are imported.
"""

from __future__ import annotations

import logging
import warnings

# megatron-core's dataset and optimizer modules, imported for GPTDataset: keizoku uses neither TE nor Apex there
HARMLESS_WARNINGS = (r"Transformer Engine and Apex are not installed",)
# torchao: optional CUDA kernels absent from a CPU or older-GPU build; torch's pytree: torchao's enum registration
HARMLESS_LOGGERS = ("torchao", "torch.utils._pytree")


def silence_library_noise() -> None:
    for message in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=UserWarning)
    for name in HARMLESS_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
