"""The fields of Megatron-Bridge's config dataclasses at a release, read from its source (no import).

keizoku's CPU tests import the Megatron-Bridge release that installs on Python 3.11 (0.3.x); releases 0.4 and
newer need Python 3.12, and 0.2.x (the NeMo 25.11 container's) was never on PyPI. To test the translation
against those too, this script reads each release's own source — Bridge's tag and the Megatron-Core tag it
runs with — from git, resolves each dataclass's bases across both trees, and writes the constructor fields
of the classes keizoku fills to ``tests/assets/megatron/bridge-fields.json``. Regenerate it when a release is
added to keizoku's support table:

    python bench/megatron/bridge_fields.py BRIDGE_GIT_DIR CORE_GIT_DIR > tests/assets/megatron/bridge-fields.json

(BRIDGE_GIT_DIR, CORE_GIT_DIR: clones of NVIDIA-NeMo/Megatron-Bridge and NVIDIA/Megatron-LM with tags.)
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys

# Bridge release -> the Megatron-Core release it is paired with (Bridge's pyproject / 3rdparty pin)
RELEASES = {
    "0.2": ("v0.2.2", "core_v0.15.3"),
    "0.3": ("v0.3.1", "core_v0.16.1"),
    "0.4": ("v0.4.2", "core_v0.17.1"),
    "0.5": ("v0.5.1", "core_v0.18.2"),
    "0.6": ("v0.6.0", "core_v0.19.0"),
}
# where each class keizoku fills is defined in Bridge
CLASSES = {
    "ConfigContainer": "megatron.bridge.training.config",
    "TrainingConfig": "megatron.bridge.training.config",
    "ValidationConfig": "megatron.bridge.training.config",
    "OptimizerConfig": "megatron.bridge.training.config",
    "DistributedDataParallelConfig": "megatron.bridge.training.config",
    "SchedulerConfig": "megatron.bridge.training.config",
    "GPTDatasetConfig": "megatron.bridge.training.config",
    "MockGPTDatasetConfig": "megatron.bridge.training.config",
    "CheckpointConfig": "megatron.bridge.training.config",
    "LoggerConfig": "megatron.bridge.training.config",
    "RNGConfig": "megatron.bridge.training.config",
    "DistributedInitConfig": "megatron.bridge.training.config",
    "TokenizerConfig": "megatron.bridge.training.tokenizers.config",
    "GPTModelProvider": "megatron.bridge.models.gpt_provider",
}


class Tree:
    """Python modules of megatron.bridge (Bridge repo, under src/) and megatron.core/.training (Megatron-LM)."""

    def __init__(self, bridge_git: str, bridge_tag: str, core_git: str, core_tag: str):
        self.sources = {}
        self.roots = [(bridge_git, bridge_tag, "src/"), (core_git, core_tag, "")]
        self.modules: dict[str, ast.Module | None] = {}
        self.packages: set[str] = set()  # modules read from an __init__.py

    def module(self, name: str) -> ast.Module | None:
        if name in self.modules:
            return self.modules[name]
        tree = None
        for git, tag, prefix in self.roots:
            base = prefix + name.replace(".", "/")
            for path in (base + ".py", base + "/__init__.py"):
                r = subprocess.run(["git", "-C", git, "show", f"{tag}:{path}"], capture_output=True, text=True)
                if r.returncode == 0:
                    tree = ast.parse(r.stdout)
                    if path.endswith("__init__.py"):
                        self.packages.add(name)
                    break
            if tree is not None:
                break
        self.modules[name] = tree
        return tree

    def find_class(self, module: str, name: str, depth: int = 0) -> tuple[str, ast.ClassDef] | None:
        tree = self.module(module)
        if tree is None or depth > 8:
            return None
        for node in tree.body:
            if isinstance(node, ast.ClassDef) and node.name == name:
                return module, node
        for node in ast.walk(tree):  # re-exports, also inside try/except
            if isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    if (alias.asname or alias.name) == name:
                        source = self.absolute(module, node)
                        found = self.find_class(source, alias.name, depth + 1)
                        if found:
                            return found
        return None

    def absolute(self, module: str, node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module
        package = module.split(".") if module in self.packages else module.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        return ".".join(package + ([node.module] if node.module else []))

    def fields(self, module: str, name: str) -> dict[str, bool]:
        """{field: settable in the constructor} over the class and its bases (bases first)."""
        found = self.find_class(module, name)
        if found is None:
            raise LookupError(f"{module}.{name} not found")
        mod, cls = found
        out: dict[str, bool] = {}
        for base in cls.bases:
            base_name = base.id if isinstance(base, ast.Name) else base.attr if isinstance(base, ast.Attribute) else None
            if base_name is None or base_name in ("ABC", "Generic", "object"):
                continue
            if isinstance(base, ast.Subscript):
                continue
            try:
                out.update(self.fields(mod, base_name))
            except LookupError:
                pass  # a base outside both trees (typing, torch): no dataclass fields
        for node in cls.body:
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                if "ClassVar" in ast.unparse(node.annotation):
                    continue
                init = True
                if isinstance(node.value, ast.Call) and ast.unparse(node.value.func).endswith("field"):
                    init = all(not (k.arg == "init" and ast.unparse(k.value) == "False") for k in node.value.keywords)
                out[node.target.id] = init
        return out


def main(bridge_git: str, core_git: str) -> None:
    result = {}
    for release, (bridge_tag, core_tag) in RELEASES.items():
        tree = Tree(bridge_git, bridge_tag, core_git, core_tag)
        classes = {}
        for name, module in CLASSES.items():
            try:
                found = tree.fields(module, name)
            except LookupError:
                continue  # not in this release (ValidationConfig before 0.4)
            classes[name] = sorted(k for k, init in found.items() if init)
        result[release] = {"bridge_tag": bridge_tag, "core_tag": core_tag, "classes": classes}
    json.dump(result, sys.stdout, indent=1, sort_keys=True)
    print()


if __name__ == "__main__":
    main(*sys.argv[1:3])
