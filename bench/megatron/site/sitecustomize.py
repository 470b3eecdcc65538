"""Test harness only (see ../te_absent.py): every Python process started with this folder on PYTHONPATH
imports Megatron-Bridge without Transformer Engine."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import te_absent  # noqa: E402

te_absent.install()
