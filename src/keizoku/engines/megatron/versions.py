"""Which Megatron-Bridge / Megatron-Core pair is installed, and whether keizoku drives it.

Bridge's config dataclasses change between releases (validation settings moved out of ``TrainingConfig`` in
0.4; 0.4+ build on ``megatron.training.config`` from Megatron-Core), so keizoku names the releases whose
fields it has checked and refuses the others before anything runs. Versions are read from package metadata
(or, for a source checkout such as the NeMo container's, from the ``package_info.py`` files) without
importing either package.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

from keizoku.engines.megatron import MegatronError

# Bridge release (major, minor) -> Megatron-Core minor versions it runs with (all 0.x)
SUPPORTED = {
    (0, 2): (15,),        # NeMo 25.11 container
    (0, 3): (15, 16),
    (0, 4): (17,),
    (0, 5): (18,),
    (0, 6): (19,),
}


class VersionError(MegatronError):
    """The installed Megatron packages are missing or not a pair keizoku supports."""


@dataclass(frozen=True)
class Versions:
    bridge: tuple[int, int, int]
    core: tuple[int, int, int]

    @property
    def release(self) -> str:
        """The Bridge release line, e.g. "0.6": the key of keizoku's per-release field tables."""
        return f"{self.bridge[0]}.{self.bridge[1]}"

    def __str__(self) -> str:
        return f"Megatron-Bridge {'.'.join(map(str, self.bridge))}, Megatron-Core {'.'.join(map(str, self.core))}"


def parse(text: str) -> tuple[int, int, int]:
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    if not m:
        raise VersionError(f"cannot read a version from {text!r}")
    return int(m[1]), int(m[2]), int(m[3] or 0)


def _installed(dist: str, package: str) -> tuple[int, int, int] | None:
    try:
        return parse(importlib.metadata.version(dist))
    except importlib.metadata.PackageNotFoundError:
        pass
    # a source checkout on PYTHONPATH (NeMo containers mount /opt/Megatron-Bridge): read package_info.py
    try:
        spec = importlib.util.find_spec("megatron")
    except (ImportError, ValueError):
        spec = None
    for root in (spec.submodule_search_locations or []) if spec else []:
        info = Path(root) / package / "package_info.py"
        if info.is_file():
            text = info.read_text()
            parts = [re.search(rf"^{k}\s*=\s*(\d+)", text, re.M) for k in ("MAJOR", "MINOR", "PATCH")]
            if all(parts):
                return tuple(int(p[1]) for p in parts)  # type: ignore[return-value]
    return None


def check(bridge: tuple[int, int, int] | None, core: tuple[int, int, int] | None) -> Versions:
    """The versions if keizoku supports the pair; else a VersionError saying what is supported."""
    table = "; ".join(f"Bridge {b[0]}.{b[1]}.x with Core " + " or ".join(f"0.{c}" for c in cores)
                      for b, cores in SUPPORTED.items())
    if bridge is None:
        raise VersionError("engine: megatron needs Megatron-Bridge, which is not installed. Run inside the NeMo "
                           "container (docs/megatron.md) or pip install 'keizoku[megatron]'. Supported: " + table)
    if core is None:
        raise VersionError("engine: megatron needs Megatron-Core (megatron-core), which is not installed")
    cores = SUPPORTED.get(bridge[:2])
    found = Versions(bridge, core)
    if cores is None:
        raise VersionError(f"{found} is not supported by this keizoku (its config fields are unchecked). "
                           f"Supported: {table}")
    if core[0] != 0 or core[1] not in cores:
        raise VersionError(f"{found}: this Bridge release runs with Megatron-Core "
                           + " or ".join(f"0.{c}" for c in cores) + f". Supported: {table}")
    return found


def detect() -> Versions:
    return check(_installed("megatron-bridge", "bridge"), _installed("megatron-core", "core"))
