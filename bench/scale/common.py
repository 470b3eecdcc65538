"""What the scale benchmarks share with bench/gpu/bench_train.py: its model shapes (``SHAPES``, ``llama_config``),
its keizoku config and model directory for ``init: random``. Loaded by path, not imported from bench/gpu: that
folder's kernels.py would stand in for the `kernels` package that transformers imports."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

_spec = importlib.util.spec_from_file_location("bench_train", ROOT / "bench/gpu/bench_train.py")
bench_train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_train)

SHAPES = bench_train.SHAPES
llama_config = bench_train.llama_config
keizoku_config = bench_train.keizoku_config
write_model_dir = bench_train.write_model_dir
rank = bench_train.rank
