"""Training engines behind one small interface: ``run(config) -> exit status``.

``torch``: FSDP2 on the Hugging Face model (keizoku.engines.torch). ``megatron``: Megatron-Bridge
(keizoku.engines.megatron), imported only for ``engine: megatron``.
"""

from __future__ import annotations

from keizoku.config import KeizokuConfig


def run(cfg: KeizokuConfig) -> int:
    if cfg.engine == "torch":
        from keizoku.engines.torch.trainer import run as run_torch

        return run_torch(cfg)
    if cfg.engine == "megatron":
        from keizoku.engines.megatron.trainer import run as run_megatron

        return run_megatron(cfg)
    raise NotImplementedError(f"engine: {cfg.engine!r} is not available in this version of keizoku")
