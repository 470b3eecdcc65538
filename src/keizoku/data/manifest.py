"""``keizoku-manifest.json``: what each dataset in a directory was made from, and how.

One manifest per output directory, next to the datasets it lists::

    {
      "format": "keizoku-manifest", "version": 1,
      "datasets": {
        "<prefix relative to this directory>": {
          "key": "text",                      # JSON field / Parquet column
          "inputs": [{"path", "size", "mtime_ns", "sha256"}],
          "documents", "empty_documents", "tokens", "dtype", "bin_bytes", "idx_bytes",
          "input_bytes",                      # uncompressed JSONL bytes read (or Parquet batch bytes)
          "skipped": {"count", "by_reason": {reason: n}, "examples": [{"path", "line", "reason"}]},
          "tokenizer": {"name_or_path", "class", "vocab_size", "eos_id", "bos_id", "fingerprint", ...},
          "flags": {"append_eod", "add_bos", "use_fast", "on_error", "text_key_order"},
          "keizoku_version", "created", "seconds", "tokens_per_second"
        }
      }
    }

An entry is written only after its ``.bin``/``.idx`` pair is complete and renamed into place, and the
manifest itself is replaced atomically (``rundir.write_atomic``), so an entry always describes finished data.
Several runs may write into one directory at once (one job per shard of a corpus): ``update_manifest``
re-reads the file under a lock and keeps the others' entries.

An entry is *current* (``entry_is_current``) — the dataset is not made again — while its tokenizer
fingerprint and flags are the run's, its inputs are the same paths with the same sizes and each either has
its recorded mtime or, touched, still its recorded sha256, and the ``.bin``/``.idx`` have their recorded sizes.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from keizoku import __version__
from keizoku.data.indexed import IndexedDatasetWriter, dataset_paths
from keizoku.data.readers import file_sha256
from keizoku.errors import KeizokuError
from keizoku.rundir import write_atomic

MANIFEST_NAME = "keizoku-manifest.json"
FORMAT = "keizoku-manifest"
VERSION = 1
MAX_SKIP_EXAMPLES = 100


class ManifestError(KeizokuError, ValueError):
    """A manifest that cannot be read."""


def read_manifest(path: Path) -> dict:
    """The manifest at ``path``; an empty one if there is none yet."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {"format": FORMAT, "version": VERSION, "datasets": {}}
    except ValueError as e:
        raise ManifestError(f"{path}: not valid JSON ({e}); move it away to start afresh") from e
    if data.get("format") != FORMAT:
        raise ManifestError(f"{path}: not a keizoku manifest")
    data.setdefault("datasets", {})
    return data


def write_manifest(path: Path, data: dict) -> None:
    write_atomic(path, json.dumps(data, indent=1, ensure_ascii=False) + "\n")


def update_manifest(path: Path, entries: dict[str, dict]) -> dict:
    """Add or replace entries under an exclusive lock, re-reading the file first."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = read_manifest(path)
        data["datasets"].update(entries)
        write_manifest(path, data)
    return data


def find(prefix_or_dir: Path) -> tuple[Path, dict] | None:
    """The manifest that lists a dataset prefix (or the one in a directory), if any."""
    path = prefix_or_dir / MANIFEST_NAME if prefix_or_dir.is_dir() else prefix_or_dir.parent / MANIFEST_NAME
    if not path.exists():
        return None
    return path, read_manifest(path)


def entry_name(manifest_path: Path, prefix: str | os.PathLike) -> str:
    """The name a dataset prefix is listed under: its path relative to the manifest's directory."""
    return os.path.relpath(Path(prefix).absolute(), manifest_path.parent.absolute())


# --- entries ---------------------------------------------------------------------------------------------------

def input_record(path: Path) -> dict:
    """An input as ``inputs`` lists it (its ``sha256`` is added once it has been read)."""
    st = path.stat()
    return {"path": str(path.absolute()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


@dataclass
class Skipped:
    """The ``skipped`` field: bad records skipped (``--on-error skip``), by reason category, the first few kept."""

    count: int = 0
    by_reason: Counter = field(default_factory=Counter)
    examples: list[dict] = field(default_factory=list)

    def add(self, path: Path, line: int | None, reason: str) -> None:
        self.by_reason[reason.split(":")[0]] += 1  # reasons read "category: detail"
        self.count += 1
        if len(self.examples) < MAX_SKIP_EXAMPLES:
            self.examples.append({"path": str(path), "line": line, "reason": reason})

    def to_json(self) -> dict:
        return {"count": self.count, "by_reason": dict(self.by_reason), "examples": self.examples}


def dataset_entry(key: str, writer: IndexedDatasetWriter, *, inputs: list[dict], input_bytes: int,
                  skipped: Skipped, tokenizer: dict, flags: dict, seconds: float) -> dict:
    """The entry of a dataset ``writer`` has just finalized."""
    bin_path, idx_path = dataset_paths(writer.prefix)
    return {
        "key": key,
        "inputs": inputs,
        "documents": writer.documents,
        "empty_documents": writer.empty_documents,
        "tokens": writer.tokens,
        "dtype": str(writer.dtype),
        "bin_bytes": bin_path.stat().st_size,
        "idx_bytes": idx_path.stat().st_size,
        "input_bytes": input_bytes,
        "skipped": skipped.to_json(),
        "tokenizer": tokenizer,
        "flags": flags,
        "keizoku_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(seconds, 3),
        "tokens_per_second": round(writer.tokens / seconds, 1) if seconds > 0 else None,
    }


def entry_is_current(entry: dict, inputs: list[Path], prefix: str, fingerprint: str, flags: dict) -> bool:
    """Whether the dataset ``entry`` describes need not be made again (see the module docstring)."""
    if entry.get("tokenizer", {}).get("fingerprint") != fingerprint or entry.get("flags") != flags:
        return False
    recorded = entry.get("inputs", [])
    if len(recorded) != len(inputs) or not all(map(_same_input, recorded, inputs)):
        return False
    bin_path, idx_path = dataset_paths(prefix)
    return (bin_path.exists() and idx_path.exists() and bin_path.stat().st_size == entry.get("bin_bytes")
            and idx_path.stat().st_size == entry.get("idx_bytes"))


def _same_input(recorded: dict, path: Path) -> bool:
    now = input_record(path)
    if recorded.get("path") != now["path"] or recorded.get("size") != now["size"]:
        return False
    return recorded.get("mtime_ns") == now["mtime_ns"] or recorded.get("sha256") == file_sha256(path)
