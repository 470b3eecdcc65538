"""``keizoku inspect``: what is in a Megatron indexed dataset (or a directory of them)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from keizoku.data import manifest as mf
from keizoku.data.indexed import IndexedDatasetReader, dataset_paths
from keizoku.data.shards import in_parts
from keizoku.errors import KeizokuError


class InspectError(KeizokuError, ValueError):
    """What ``keizoku inspect`` was given cannot be read (a --tokenizer that does not load)."""


def resolve(path: str) -> tuple[list[str], Path | None, dict]:
    """Dataset prefixes under ``path`` (a prefix, a .bin/.idx file, or a directory) and their manifest."""
    p = Path(path)
    if p.suffix in (".bin", ".idx") and p.exists():
        p = p.with_suffix("")
    if p.is_dir():
        prefixes = sorted(str(i.with_suffix("")) for i in p.rglob("*.idx") if not in_parts(i, p))  # merged only
        if not prefixes:
            raise FileNotFoundError(f"{path}: no .idx files in this directory")
    else:
        if not dataset_paths(p)[1].exists():
            raise FileNotFoundError(f"{path}: no dataset here (expected {p}.idx and {p}.bin)")
        prefixes = [str(p)]
    found = mf.find(p if p.is_dir() else Path(prefixes[0]))
    return prefixes, (found[0] if found else None), (found[1] if found else {"datasets": {}})


def manifest_entry(manifest_path: Path | None, manifest: dict, prefix: str) -> dict | None:
    """What the manifest records about the dataset at ``prefix``, if it lists it; its ``tokenizer.name_or_path`` as
    a path that loads from the current directory (``manifest.tokenizer_path``) where it can be found, else as
    recorded (``decode`` then says which key to fix)."""
    if manifest_path is None:
        return None
    name = mf.entry_name(manifest_path, prefix)
    entry = manifest["datasets"].get(name)
    if entry is None or not isinstance(entry.get("tokenizer"), dict):
        return entry
    try:
        found = mf.tokenizer_path(manifest_path, name, entry)
    except mf.ManifestError:
        return entry
    return {**entry, "tokenizer": {**entry["tokenizer"], "name_or_path": found}}


def stats(prefix: str) -> dict:
    ds = IndexedDatasetReader(prefix)
    lengths = ds.document_lengths()
    out = {
        "prefix": prefix,
        "documents": len(ds),
        "empty_documents": int(np.count_nonzero(lengths == 0)),
        "tokens": int(lengths.sum()),
        "dtype": str(ds.dtype),
        "bin_bytes": ds.bin_path.stat().st_size,
    }
    if len(lengths):
        q = np.percentile(lengths, [0, 50, 90, 99, 100])
        out.update(mean=float(lengths.mean()), min=int(q[0]), p50=float(q[1]), p90=float(q[2]),
                   p99=float(q[3]), max=int(q[4]))
    out["histogram"] = histogram(lengths)
    return out


def histogram(lengths: np.ndarray) -> list[tuple[str, int]]:
    """Documents per power-of-two length bucket: 0, 1, 2-3, 4-7, …"""
    if not len(lengths):
        return []
    rows = [("0", int(np.count_nonzero(lengths == 0)))]
    top = int(lengths.max())
    lo = 1
    while lo <= top:
        hi = lo * 2 - 1
        n = int(np.count_nonzero((lengths >= lo) & (lengths <= hi)))
        rows.append((f"{lo}" if lo == hi else f"{lo}-{hi}", n))
        lo *= 2
    return rows if rows[0][1] else rows[1:]


def decode(prefix: str, n: int, tokenizer: str) -> list[tuple[int, int, str]]:
    """The first ``n`` documents of the dataset, decoded with ``tokenizer`` (--tokenizer, or the manifest's, as
    ``manifest_entry`` gives it); a ManifestError naming the manifest's key, or an InspectError naming --tokenizer,
    if it does not load."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(tokenizer)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds (OSError, ValueError, hub errors)
        raise _tokenizer_error(prefix, tokenizer, e) from None
    ds = IndexedDatasetReader(prefix)
    out = []
    for i in range(min(n, len(ds))):
        ids = ds.document(i).tolist()
        out.append((i, len(ids), tok.decode(ids, skip_special_tokens=False)))
    return out


def _tokenizer_error(prefix: str, tokenizer: str, error: Exception) -> KeizokuError:
    """Why ``tokenizer`` does not load for ``prefix``, naming the manifest key it came from, or --tokenizer."""
    why = f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"
    found = mf.find(Path(prefix))
    if found is not None:
        path, manifest = found
        name = mf.entry_name(path, prefix)
        entry = manifest["datasets"].get(name)
        recorded = ((entry or {}).get("tokenizer") or {}).get("name_or_path")
        if recorded is not None:
            try:
                resolved = mf.tokenizer_path(path, name, entry)
            except mf.ManifestError as e:
                resolved, missing = None, e  # the recorded path is nowhere: its message names the manifest and key
            if tokenizer == recorded and resolved is None:
                return missing
            if tokenizer in (recorded, resolved):
                return mf.ManifestError(f"{path}: datasets.{name}.tokenizer.name_or_path: {recorded!r} does not "
                                        f"load as a tokenizer ({why}); pass --tokenizer with the tokenizer's "
                                        "directory")
    return InspectError(f"--tokenizer {tokenizer}: does not load as a tokenizer ({why}); give the tokenizer's "
                        "directory or hub id")
