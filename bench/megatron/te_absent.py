"""Test harness only: import Megatron-Bridge where Transformer Engine (TE) is not installed.

A few Bridge modules import TE at the top (``megatron/bridge/peft/lora_layers.py``, and in 0.3.x
``peft/lora.py``), and ``import megatron.bridge`` reaches them through AutoBridge, so without TE nothing of
Bridge imports — not even its config dataclasses. keizoku's users run inside the NeMo container, where TE is
present and none of this applies; keizoku itself never does this. CPU tests and the GPU machines used for
keizoku's own checks have no TE, so there, and only there, this import hook rewrites each such top-level
``import transformer_engine... as NAME`` (when the module is loaded, without touching the installed files)
into a guarded import that binds NAME to a placeholder. The placeholder lets class definitions such as
``class TELinearAdapter(te.Linear)`` be evaluated; instantiating anything from it raises, so no code path
can use TE silently.

The same holds for Triton, which a few Megatron-Core modules import at the top (inference and
batch-invariant kernels, reached through Bridge's imports) and which CPU machines need not have: an absent
``triton`` becomes a placeholder whose ``@triton.jit`` decorators return kernels that raise when launched.

Use: ``import te_absent; te_absent.install()`` before importing Bridge (``bench/megatron/site/sitecustomize.py``
does it for every Python process started with that folder on PYTHONPATH).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import re
import sys

_TOP_LEVEL_TE_IMPORT = re.compile(r"^import (transformer_engine[\w.]*) as (\w+)$", re.M)
_TOP_LEVEL_TRITON_IMPORT = re.compile(r"^import (triton(?:\.\w+)*)(?: as (\w+))?(?=\s*(?:#.*)?$)", re.M)


class _AbsentMeta(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _placeholder(f"{cls.__qualname__}.{name}")


def _placeholder(qualname: str) -> type:
    def refuse(self, *args, **kwargs):
        raise RuntimeError(f"Transformer Engine is not installed ({qualname} was used)")

    cls = _AbsentMeta(qualname.rsplit(".", 1)[-1], (), {"__init__": refuse})
    cls.__qualname__ = qualname
    return cls


class _AbsentTriton:
    """``triton`` / ``triton.language`` where Triton is missing: decorators work, launching a kernel raises."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _AbsentTriton(f"{self._name}.{attr}")

    def __call__(self, *args, **kwargs):
        if len(args) == 1 and callable(args[0]) and not kwargs:  # @triton.jit
            return _AbsentTriton(f"{self._name}({getattr(args[0], '__name__', '?')})")
        if not args:  # @triton.jit(launch_metadata=...), @triton.autotune(configs=...)
            return _AbsentTriton(f"{self._name}(...)")
        raise RuntimeError(f"Triton is not installed ({self._name} was called)")

    def __getitem__(self, grid):
        raise RuntimeError(f"Triton is not installed ({self._name} was launched)")


def _guard_triton(m: re.Match) -> str:
    module, alias = m[1], m[2]
    name = alias or module.split(".")[0]
    target = module if alias else module.split(".")[0]
    return f"try: import {module}{' as ' + alias if alias else ''}\nexcept ImportError: {name} = __triton_absent__('{target}')"


class _GuardedLoader(importlib.machinery.SourceFileLoader):
    def get_code(self, fullname):  # compiled from the rewritten source; the cached .pyc is not used
        source = self.get_data(self.path).decode()
        source = _TOP_LEVEL_TE_IMPORT.sub(
            lambda m: f"try: import {m[1]} as {m[2]}\nexcept ImportError: {m[2]} = __te_absent__", source)
        if _missing("triton"):
            source = _TOP_LEVEL_TRITON_IMPORT.sub(_guard_triton, source)
        return compile(source, self.path, "exec", dont_inherit=True)

    def exec_module(self, module):
        module.__dict__["__te_absent__"] = _placeholder("transformer_engine.pytorch")
        module.__dict__["__triton_absent__"] = _AbsentTriton
        super().exec_module(module)


def _missing(package: str) -> bool:
    return importlib.util.find_spec(package) is None


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if not name.startswith(("megatron.bridge.", "megatron.core.")):
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or not (spec.origin or "").endswith(".py"):
            return None
        with open(spec.origin, encoding="utf-8") as f:
            source = f.read()
        if not (name.startswith("megatron.bridge.") and _TOP_LEVEL_TE_IMPORT.search(source)
                or _missing("triton") and _TOP_LEVEL_TRITON_IMPORT.search(source)):
            return None
        spec.loader = _GuardedLoader(name, spec.origin)
        return spec


def install() -> None:
    """Add the hook once, and only where TE or Triton really is missing."""
    if not (_missing("transformer_engine") or _missing("triton")):
        return
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
