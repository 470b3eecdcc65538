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

``tokenizer.name_or_path`` is stored so that it reads from any directory (``stored_tokenizer_path``): a local
tokenizer directory inside the manifest's directory relative to it (``./tok``: the datasets and their tokenizer
move together), any other absolute; a hub id as given. ``tokenizer_path`` reads it back, and reads manifests of
earlier releases, which kept the path as typed: a relative path is looked for in the manifest's directory, then in
the current one.

An entry is written only after its ``.bin``/``.idx`` pair is complete and renamed into place, and the
manifest itself is replaced atomically (``rundir.write_atomic``), so an entry always describes finished data.
Several runs may write into one directory at once (one job per shard of a corpus): ``update_manifest``
re-reads the file under a lock and keeps the others' entries.

An entry is *current* (``entry_is_current``) — the dataset is not made again — while its tokenizer
fingerprint and flags are the run's, its inputs are the same paths with the same sizes and each either has
its recorded mtime or, touched, still its recorded sha256, and the ``.bin``/``.idx`` have their recorded sizes.

Sharded runs (``shards``): a task's share of a split file is recorded with its ``range`` ``[start, end)`` (the
lines that start in it), and its ``sha256`` is of the bytes ``hashed`` ``[start - 1, end of its last line)``
(which decide where its lines begin and end), not of the whole file. A merged dataset (``merge``) records a split
file with ``"sha256": null`` and its shares' hashes as ``ranges``: no task read it whole, and the ranges' hashes
stand in for the file's. A share's manifest also holds ``"shard": {"index", "of", "plan"}``.
"""

from __future__ import annotations

import hashlib
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


def update_manifest(path: Path, entries: dict[str, dict], fields: dict | None = None) -> dict:
    """Add or replace entries (and top-level ``fields``) under an exclusive lock, re-reading the file first; each
    entry's tokenizer path is stored as ``stored_tokenizer_path`` says."""
    import fcntl

    entries = {name: _with_stored_tokenizer(path, entry) for name, entry in entries.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = read_manifest(path)
        data["datasets"].update(entries)
        data.update(fields or {})
        write_manifest(path, data)
    return data


# --- the tokenizer's path ---------------------------------------------------------------------------------------

def stored_tokenizer_path(manifest_path: Path, name_or_path: str) -> str:
    """How the manifest at ``manifest_path`` records the tokenizer ``name_or_path`` (as given to tokenize, relative
    to the current directory): a local directory inside the manifest's directory as ``./RELATIVE``, another one
    absolute; anything else (a hub id) as it is."""
    local = Path(name_or_path).expanduser()
    if not local.exists():
        return name_or_path
    absolute = Path(os.path.abspath(local))
    home = Path(os.path.abspath(manifest_path.parent))
    if absolute == home or home in absolute.parents:
        return "./" + absolute.relative_to(home).as_posix() if absolute != home else "."
    return str(absolute)


def tokenizer_path(manifest_path: Path, name: str, entry: dict) -> str:
    """The tokenizer entry ``name`` of the manifest was made with, as a path that loads from here (or a hub id):
    absolute paths as they are; a relative one in the manifest's directory, else (manifests of earlier releases, which
    kept the path as typed) in the current directory; a ManifestError naming the manifest and key if neither has
    it."""
    recorded = (entry.get("tokenizer") or {}).get("name_or_path")
    key = f"datasets.{name}.tokenizer.name_or_path"
    if not isinstance(recorded, str) or not recorded:
        raise ManifestError(f"{manifest_path}: {key}: not recorded; pass --tokenizer")
    path = Path(recorded).expanduser()
    if path.is_absolute():
        if path.exists():
            return str(path)
        raise ManifestError(f"{manifest_path}: {key}: {recorded} no longer exists; pass --tokenizer with the "
                            "tokenizer's directory")
    candidates = [Path(os.path.abspath(manifest_path.parent / path)), Path(os.path.abspath(path))]
    found = next((c for c in candidates if c.exists()), None)
    if found is not None:
        return str(found)
    if _hub_id(recorded):
        return recorded
    raise ManifestError(f"{manifest_path}: {key}: {recorded!r} is relative and is neither in {candidates[0].parent} "
                        f"(the manifest's directory) nor in {Path.cwd()} (the current one); pass --tokenizer with the "
                        "tokenizer's directory")


def _hub_id(name: str) -> bool:
    """Whether ``name`` may be a Hugging Face hub id (``name`` or ``owner/name``) rather than a path."""
    return not name.startswith((".", "~", "/")) and name.count("/") <= 1 and "\\" not in name


def _with_stored_tokenizer(manifest_path: Path, entry: dict) -> dict:
    tokenizer = entry.get("tokenizer")
    if not isinstance(tokenizer, dict) or not isinstance(tokenizer.get("name_or_path"), str):
        return entry
    stored = stored_tokenizer_path(manifest_path, tokenizer["name_or_path"])
    return {**entry, "tokenizer": {**tokenizer, "name_or_path": stored}}


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


def entry_is_current(entry: dict, inputs: list, prefix: str, fingerprint: str, flags: dict) -> bool:
    """Whether the dataset ``entry`` describes need not be made again (see the module docstring). ``inputs``: paths,
    or ``InputFile``s (a share's byte range is compared too)."""
    if entry.get("tokenizer", {}).get("fingerprint") != fingerprint or entry.get("flags") != flags:
        return False
    recorded = entry.get("inputs", [])
    if len(recorded) != len(inputs) or not all(map(_same_input, recorded, inputs)):
        return False
    bin_path, idx_path = dataset_paths(prefix)
    return (bin_path.exists() and idx_path.exists() and bin_path.stat().st_size == entry.get("bin_bytes")
            and idx_path.stat().st_size == entry.get("idx_bytes"))


def _same_input(recorded: dict, source) -> bool:
    """Whether the input ``recorded`` is still what ``source`` (a path, or an ``InputFile``) is on disk."""
    path, span = Path(getattr(source, "path", source)), getattr(source, "span", None)
    if recorded.get("range") != (list(span) if span is not None else None):
        return False
    try:
        now = input_record(path)
    except FileNotFoundError:
        return False
    if recorded.get("path") != now["path"] or recorded.get("size") != now["size"]:
        return False
    if recorded.get("mtime_ns") == now["mtime_ns"]:
        return True
    pieces = recorded.get("ranges") or ([recorded] if "range" in recorded else None)
    if pieces is None:
        return recorded.get("sha256") == file_sha256(path)
    return all(p.get("sha256") == span_sha256(path, *p["hashed"]) for p in pieces)


def span_sha256(path: Path, start: int, end: int, block: int = 1 << 22) -> str:
    """The SHA-256 of bytes ``[start, end)`` of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        left = end - start
        while left > 0 and (data := f.read(min(block, left))):
            h.update(data)
            left -= len(data)
    return h.hexdigest()
