"""engine: megatron — the keizoku config trained by Megatron-Bridge (inside the NeMo container, or wherever
megatron-bridge and megatron-core are installed).

``versions`` (which Bridge/Core pair, refused if unsupported) · ``plan`` (keizoku config → Bridge fields, as
data) · ``container`` (the Bridge objects) · ``importer`` (HF → Megatron, cached by fingerprint) · ``trainer``
(``pretrain``) · ``reporting`` (keizoku's callbacks: metrics.jsonl, evaluation, walltime signals) · ``export``
(Megatron → HF, verified). Nothing here is imported by ``engine: torch``.

Entry points (``keizoku.engines.ENGINES``): ``trainer.train``, ``export.export`` and ``importer.import_for_cli``.
"""

from __future__ import annotations

from keizoku.errors import KeizokuError


class MegatronError(KeizokuError, RuntimeError):
    """engine: megatron cannot go on; the message says why (the CLI prints it without a traceback)."""
