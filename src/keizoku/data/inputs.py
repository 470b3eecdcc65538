"""Which files ``keizoku tokenize`` reads, in which order, and the name each gives its datasets.

Inputs are files, directories (searched recursively for files of a registered format, ``readers.suffixes``)
and quoted globs, taken in the order given, each directory's and glob's files sorted; a file named twice (by
any path) is read once. An input's *name* is its path relative to the directory it was found in — just the
file name for a file or a glob match — without the format's suffix: ``data/ja/wiki/00.jsonl.gz`` found in
``data/ja`` is ``wiki/00``, written as ``OUT/wiki/00_text_document.bin/.idx`` with ``--output-dir OUT``.

A task of a sharded run (``keizoku tokenize --shard K/N``, ``shards``) may read a byte range of a file: an
``InputFile`` with a ``span``, whose reading and meaning are ``shards``'.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path

from keizoku.data.readers import InputError, input_suffix, reader_for, suffixes


@dataclass(frozen=True)
class InputFile:
    path: Path
    name: str  # path relative to the directory it was found in (or the file name), without suffix
    span: tuple[int, int] | None = None  # a share's byte range [start, end) of the file (shards); None: all of it

    @property
    def where(self) -> Path | str:
        """How messages name it: its path; a share of a file that does not start it counts lines from its start,
        and says so: ``PATH (share from byte N)``."""
        return self.path if not self.span or self.span[0] == 0 else f"{self.path} (share from byte {self.span[0]:,})"

    @property
    def disk_bytes(self) -> int:
        """The bytes on disk this input stands for: its span's, or the file's size."""
        return self.span[1] - self.span[0] if self.span is not None else self.path.stat().st_size


def discover(inputs: list[str]) -> list[InputFile]:
    """Files, directories (recursive) and globs, in a fixed order: as given; sorted within each."""
    found: dict[Path, InputFile] = {}
    for spec in inputs:
        for path, base in _expand(spec):
            found.setdefault(path.resolve(), _input_file(path, base))
    return list(found.values())


def _expand(spec: str) -> list[tuple[Path, Path | None]]:
    """The input files ``spec`` names, each with the directory its name is relative to (None: the file's own)."""
    p = Path(spec)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and input_suffix(f))
        if not files:
            raise InputError(f"{spec}: directory has no input files ({', '.join(suffixes())})")
        return [(f, p) for f in files]
    if p.is_file():
        reader_for(p)  # an unsupported file type is an InputError
        return [(p, None)]
    if glob.has_magic(spec):
        files = sorted(Path(f) for f in glob.glob(spec, recursive=True) if Path(f).is_file() and input_suffix(f))
        if not files:
            raise InputError(f"{spec}: pattern matches no input files")
        return [(f, None) for f in files]
    raise InputError(f"{spec}: no such file or directory")


def _input_file(path: Path, base: Path | None) -> InputFile:
    rel = path.relative_to(base) if base is not None else Path(path.name)
    return InputFile(path=path, name=str(rel)[: -len(input_suffix(path))])
