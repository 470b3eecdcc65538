"""Files that are never seen half-written: each is written under a hidden temporary name in its own directory and
renamed into place. A reader, or the run that resumes after a crash, sees the old file or the new one, never part of
one (a rename within a directory is atomic on POSIX file systems, Lustre and GPFS included).

Multi-file outputs (checkpoints, indexed datasets, HF exports) use the same rule on a directory or a file pair;
``keizoku.launch.driver`` keeps its own copy because it runs on the scheduler host's bare ``python3``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union


def write_atomic(path: Union[str, os.PathLike], data: Union[str, bytes], mode: Optional[int] = None) -> Path:
    """Write ``data`` (text as UTF-8) to ``path``, creating its directory; ``mode``: its permission bits."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
