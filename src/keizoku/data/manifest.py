"""``keizoku-manifest.json``: what each dataset in a directory was made from, and how.

One manifest per output directory, next to the datasets it lists::

    {
      "format": "keizoku-manifest", "version": 1,
      "datasets": {
        "<prefix relative to this directory>": {
          "key": "text",                      # JSON field / Parquet column
          "inputs": [{"path", "size", "mtime_ns", "sha256"}],
          "documents", "empty_documents", "tokens", "dtype", "bin_bytes", "idx_bytes",
          "input_bytes",                      # uncompressed JSONL bytes read (or Parquet file bytes)
          "skipped": {"count", "by_reason": {reason: n}, "examples": [{"path", "line", "reason"}]},
          "tokenizer": {"name_or_path", "class", "vocab_size", "eos_id", "bos_id", "fingerprint", ...},
          "flags": {"append_eod", "add_bos", "use_fast", "on_error"},
          "keizoku_version", "created", "seconds", "tokens_per_second"
        }
      }
    }

An entry is written only after its ``.bin``/``.idx`` pair is complete and renamed into place, and the
manifest itself is replaced atomically, so an entry always describes finished data.
"""

from __future__ import annotations

import json
from pathlib import Path

from keizoku.files import write_atomic

MANIFEST_NAME = "keizoku-manifest.json"
FORMAT = "keizoku-manifest"
VERSION = 1


def load(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {"format": FORMAT, "version": VERSION, "datasets": {}}
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); move it away to start afresh") from e
    if data.get("format") != FORMAT:
        raise ValueError(f"{path}: not a keizoku manifest")
    data.setdefault("datasets", {})
    return data


def save(path: Path, data: dict) -> None:
    write_atomic(path, json.dumps(data, indent=1, ensure_ascii=False) + "\n")


def update(path: Path, entries: dict[str, dict]) -> dict:
    """Add or replace entries under an exclusive lock, re-reading the file first.

    Several runs may write into one directory at once (one job per shard of a corpus); each keeps the
    others' entries.
    """
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = load(path)
        data["datasets"].update(entries)
        save(path, data)
    return data


def find(prefix_or_dir: Path) -> tuple[Path, dict] | None:
    """The manifest that lists a dataset prefix (or the one in a directory), if any."""
    path = prefix_or_dir / MANIFEST_NAME if prefix_or_dir.is_dir() else prefix_or_dir.parent / MANIFEST_NAME
    if not path.exists():
        return None
    return path, load(path)
