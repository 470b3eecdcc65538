"""Sharded tokenizing: which task of ``N`` reads what (the *plan*), and how a task reads a byte range of a file.

``keizoku tokenize INPUTS … --shard K/N`` (K = 1…N, as ``split -n l/K/N`` counts) tokenizes share K of N, and
``keizoku tokenize-merge`` (``merge``) joins the shares' parts into what one run over INPUTS writes, byte for byte.

**The plan** (``make_plan``). The inputs, in the order a run reads them (``inputs.discover``), are laid end to end
as one stream of their bytes on disk, and the stream is cut into ``N`` shares of about equal size: cut ``k`` aims
at ``k × total / N``. A cut that falls inside an uncompressed JSON Lines file (``.jsonl``, ``.json``) stays there,
so one large file spreads over several tasks, unless it is within 1 % of a share's size of the file's start or
end; inside any other file (gzip, zstd, Parquet: they cannot be entered in the middle) it moves to that file's
nearer end. So each share is a *contiguous* run of the inputs — whole files, and at its ends perhaps part of a
file — and the shares, in order, are the inputs in order: merging is concatenating. Shares differ from the
average by at most the largest file that cannot be split (and 1 % where a cut snapped to a file's end); a share
may be empty (more tasks than there are pieces to give). The plan depends only on the inputs' paths, names and
sizes, ``N`` and the output, so every task computes the same one; the first writes it to ``PARTS/plan.json``
and the others check theirs against it: a task that sees other inputs (a file that grew) stops rather than
write parts of another plan.

**A byte range** ``[start, end)`` of a file owns the lines that *start* in it: a range that starts inside a
line skips to the next newline, and its last line runs on past ``end`` to its newline (or the end of the file).
Consecutive ranges therefore own every line exactly once (``RangeReader``). A range counts no lines before it
(that would mean reading them): bad input in a range that does not start the file is named by the range and
its line in it, and by its byte offset in the file — ``big.jsonl (share from byte 1,000,000):7: malformed JSON:
… (at byte offset 1,234,567)`` — in messages and in the share's manifest; the merge, which knows how many lines
each range holds (its input record's ``lines``), gives the merged manifest real line numbers again. Whole files
and a range that starts its file give real line numbers throughout.

**Where parts go** (``parts_root``, ``share_dir``): ``--output-dir OUT`` → ``OUT/parts/``; ``--output-prefix
DIR/NAME`` → ``DIR/NAME.parts/``. Share K of N writes what a run over its pieces would write
(``--output-dir``: one dataset per input it holds, under the input's name; ``--output-prefix``: one dataset,
its pieces in order) into ``PARTS/shard-K-of-N/``, with its own ``keizoku-manifest.json``, and resumes as
any run does. Beside them: ``plan.json``, and ``keizoku submit tokenize``'s ``submit/``, ``logs/`` and
``jobs.jsonl``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from bisect import bisect_right
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import Iterator, Sequence

from keizoku.data.inputs import InputFile
from keizoku.data.manifest import input_record
from keizoku.data.readers import Chunk, JsonlReader, open_reader, reader_for
from keizoku.data.records import Record, json_texts
from keizoku.errors import KeizokuError
from keizoku.rundir import write_atomic

PLAN_NAME = "plan.json"
PLAN_FORMAT = "keizoku-shard-plan"
PLAN_VERSION = 1
SNAP = 0.01  # a cut within this fraction of a share's size of a file's end moves to that end


class ShardError(KeizokuError):
    """A share that cannot be run or merged as asked; the message says why and what to do."""


def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` → (K, N), 1 ≤ K ≤ N; ValueError saying what to write otherwise."""
    k, sep, n = str(text).partition("/")
    if not sep or not k.strip().isdigit() or not n.strip().isdigit():
        raise ValueError(f"{text!r} is not K/N (share K of N, counted from 1: 1/4 … 4/4)")
    k_, n_ = int(k), int(n)
    if not 1 <= k_ <= n_:
        raise ValueError(f"{text!r}: K must be 1 to N (share K of N, counted from 1: 1/{max(n_, 1)} … "
                         f"{max(n_, 1)}/{max(n_, 1)})")
    return k_, n_


# --- where parts go ------------------------------------------------------------------------------------------

def parts_root(output_dir: str | os.PathLike | None, output_prefix: str | None) -> Path:
    """The directory of a sharded run's parts: ``OUT/parts`` or ``PREFIX.parts``."""
    if (output_dir is None) == (output_prefix is None):
        raise ShardError("give exactly one of --output-dir and --output-prefix")
    if output_dir is not None:
        return Path(output_dir).absolute() / "parts"
    return Path(f"{Path(output_prefix).absolute()}.parts")


def share_dir(root: Path, k: int, n: int) -> Path:
    """``PARTS/shard-K-of-N`` (K zero-padded to N's width, so that they sort)."""
    return root / f"shard-{k:0{len(str(n))}d}-of-{n}"


def in_parts(path: Path, below: Path) -> bool:
    """Whether ``path`` lies in a share's directory inside ``below`` (``keizoku inspect DIR`` leaves parts out)."""
    for d in Path(path).parents:
        if d == below or below not in d.parents:
            return False
        if re.fullmatch(r"shard-\d+-of-\d+", d.name) and (d.parent / PLAN_NAME).is_file():
            return True
    return False


# --- the plan ------------------------------------------------------------------------------------------------

def splittable(path: Path) -> bool:
    """Whether a file may be cut into byte ranges: uncompressed JSON Lines."""
    return reader_for(path) is JsonlReader


def assign(sizes: Sequence[int], split: Sequence[bool], n: int) -> list[list[tuple[int, int, int]]]:
    """Per share (``n`` of them), its pieces ``(input index, start, end)`` (see the module docstring)."""
    total = sum(sizes)
    starts = [0, *accumulate(sizes)][:-1] if sizes else []
    slack = SNAP * total / n
    cuts = [0]
    for k in range(1, n):
        t = total * k // n
        if t < total:
            i = bisect_right(starts, t) - 1  # the file holding byte t (zero-size files hold none)
            lo, hi = starts[i], starts[i] + sizes[i]
            if not (split[i] and t - lo > slack and hi - t > slack):
                t = lo if t - lo < hi - t else hi
        cuts.append(max(t, cuts[-1]))
    cuts.append(total)
    shares: list[list[tuple[int, int, int]]] = [[] for _ in range(n)]
    for i, (lo, size) in enumerate(zip(starts, sizes)):
        k = bisect_right(cuts, lo)  # the first share that ends after lo
        if size == 0:
            shares[min(k, n) - 1].append((i, 0, 0))
            continue
        while k <= n and cuts[k - 1] < lo + size:
            a, b = max(lo, cuts[k - 1]), min(lo + size, cuts[k])
            if a < b:
                shares[k - 1].append((i, a - lo, b - lo))
            k += 1
    return shares


@dataclass
class Plan:
    """Which share holds which pieces of which inputs (``plan.json``)."""

    shares: int
    output: dict  # {"dir": absolute path} or {"prefix": absolute path}
    inputs: list[dict]  # {"path" (absolute), "name", "size", "split"}
    pieces: list[list[list[int]]]  # per share: [input index, start, end]

    @property
    def id(self) -> str:
        body = json.dumps([self.shares, self.output, self.inputs, self.pieces], sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(body.encode()).hexdigest()[:16]

    def to_json(self) -> str:
        return json.dumps({"format": PLAN_FORMAT, "version": PLAN_VERSION, "id": self.id, "shares": self.shares,
                           "output": self.output, "inputs": self.inputs, "pieces": self.pieces},
                          indent=1, ensure_ascii=False) + "\n"

    @classmethod
    def from_json(cls, data: dict) -> "Plan":
        return cls(int(data["shares"]), dict(data["output"]), list(data["inputs"]), list(data["pieces"]))

    def share(self, k: int) -> list[InputFile]:
        """Share ``k``'s pieces (1-based), in input order, as inputs: a whole file, or a ``span`` of one."""
        out = []
        for i, a, b in self.pieces[k - 1]:
            f = self.inputs[i]
            span = None if (a, b) == (0, f["size"]) else (a, b)
            out.append(InputFile(Path(f["path"]), f["name"], span))
        return out

    def share_bytes(self, k: int) -> int:
        return sum(b - a for _, a, b in self.pieces[k - 1])

    def holders(self, input_index: int) -> list[int]:
        """The shares (1-based, in order) that hold a piece of an input."""
        return [k + 1 for k, pieces in enumerate(self.pieces) if any(p[0] == input_index for p in pieces)]

    def describe(self, k: int) -> str:
        """``a.jsonl.gz, big.jsonl [bytes 0–1,048,576)`` (at most 4 pieces named)."""
        pieces = self.share(k)
        if not pieces:
            return "nothing (more shares than pieces of the inputs)"
        words = [Path(f.path).name + (f" [bytes {f.span[0]:,}–{f.span[1]:,})" if f.span else "") for f in pieces[:4]]
        more = f" and {len(pieces) - 4} more" if len(pieces) > 4 else ""
        return f"{', '.join(words)}{more} ({self.share_bytes(k) / 1e6:,.1f} MB)"


def make_plan(inputs: list[InputFile], n: int, output: dict) -> Plan:
    """The plan of ``n`` shares over ``inputs`` (in their order) for ``output`` (module docstring)."""
    if n < 1:
        raise ShardError(f"the number of shares must be at least 1, not {n}")
    records = [{"path": str(f.path.absolute()), "name": f.name, "size": f.path.stat().st_size,
                "split": splittable(f.path)} for f in inputs]
    shares = assign([r["size"] for r in records], [r["split"] for r in records], n)
    return Plan(n, output, records, [[list(p) for p in s] for s in shares])


def read_plan(root: Path) -> Plan | None:
    path = root / PLAN_NAME
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise ShardError(f"{path}: not valid JSON ({e}); move it away to plan afresh") from None
    if data.get("format") != PLAN_FORMAT:
        raise ShardError(f"{path}: not a keizoku shard plan")
    return Plan.from_json(data)


def pin_plan(root: Path, plan: Plan, write: bool = True) -> None:
    """Check ``plan`` against ``PARTS/plan.json``, or (``write``) write it there if there is none yet: the shares of
    one set of parts must all come from one plan."""
    pinned = read_plan(root)
    if pinned is None:
        if write:
            write_atomic(root / PLAN_NAME, plan.to_json())
        return
    if pinned.id != plan.id:
        raise ShardError(f"{root / PLAN_NAME}: its parts were planned for {plan_difference(pinned, plan)}; the shares "
                         f"of one merge must see the same inputs: restore them, or move {root} away to start over")


def plan_difference(then: Plan, now: Plan) -> str:
    """What differs between the plan on disk (``then``) and this run's, in words."""
    if then.shares != now.shares:
        return f"{then.shares} shares, and this run asks for {now.shares}"
    if then.output != now.output:
        return f"output {_output_words(then.output)}, and this run writes {_output_words(now.output)}"
    old, new = {i["path"]: i for i in then.inputs}, {i["path"]: i for i in now.inputs}
    for path in old.keys() - new.keys():
        return f"inputs that include {path}, which this run does not read"
    for path in new.keys() - old.keys():
        return f"inputs without {path}, which this run reads"
    for path, i in old.items():
        if i["size"] != new[path]["size"]:
            return f"{path} at {i['size']:,} bytes, and it has {new[path]['size']:,} now"
        if i["name"] != new[path]["name"]:
            return f"{path} named {i['name']!r}, and this run names it {new[path]['name']!r}"
    if [i["path"] for i in then.inputs] != [i["path"] for i in now.inputs]:
        return "the same inputs in another order"
    return "other inputs (another keizoku release's plan?)"


def _output_words(output: dict) -> str:
    return f"--output-dir {output['dir']}" if "dir" in output else f"--output-prefix {output['prefix']}"


def output_of(output_dir, output_prefix) -> dict:
    """The plan's ``output``: where the merged datasets go."""
    if output_dir is not None:
        return {"dir": str(Path(output_dir).absolute())}
    return {"prefix": str(Path(output_prefix).absolute())}


# --- reading an input, whole or a range of it --------------------------------------------------------------------

def located(reason: str, offset: int) -> str:
    """A bad record's reason with its byte offset in the file (``merge`` takes it off again); the category, what
    precedes the first colon, stays as it was."""
    return f"{reason} (at byte offset {offset:,})" if ":" in reason else f"{reason}: at byte offset {offset:,}"




@dataclass
class RangeLines(Chunk):
    """Whole lines of a byte range of an uncompressed JSON Lines file: bytes ``[offset, offset + length)`` of
    ``path``, read by whoever parses them (a worker process). As any chunk's, its records are numbered from 1;
    ``located``: a bad record's reason also gives its byte offset in the file (a share that does not start the
    file, whose line numbers count from the share's start)."""

    path: str = ""
    offset: int = 0
    length: int = 0
    located: bool = False

    @property
    def text_bytes(self) -> int:
        return self.length

    def records(self, keys: Sequence[str]) -> Iterator[Record]:
        with open(self.path, "rb") as f:
            data = os.pread(f.fileno(), self.length, self.offset)
        if len(data) != self.length:
            raise ShardError(f"{self.path}: the file changed while it was read (shorter than "
                             f"{self.offset + self.length:,} bytes)")
        lines = data.split(b"\n")
        if lines and not lines[-1]:
            lines.pop()
        pos = self.offset
        for i, line in enumerate(lines, 1):
            texts, reason = json_texts(line, keys)
            if reason is not None and self.located:
                reason = located(reason, pos)
            yield i, texts, reason
            pos += len(line) + 1


def line_start(f, pos: int, block: int = 1 << 16) -> int:
    """The first line start at or after ``pos`` in the open binary file ``f`` (its size if none): 0, or just past
    the first newline at or after ``pos - 1``."""
    if pos <= 0:
        return 0
    at = pos - 1
    while True:
        data = os.pread(f.fileno(), block, at)
        if not data:
            return at
        i = data.find(b"\n")
        if i >= 0:
            return at + i + 1
        at += len(data)


class RangeReader:
    """The lines that start in bytes ``span`` of an uncompressed JSON Lines file, as ``RangeLines`` chunks of about
    ``chunk_bytes``. Once the iteration has ended: ``lines``, how many it owns, and ``sha256``, of bytes ``hashed``
    = ``[start - 1, end of the last line)``, which decide which lines it owns."""

    def __init__(self, path: Path, span: tuple[int, int], chunk_bytes: int):
        self.path, self.span = Path(path), span
        self.chunk_bytes = max(1, chunk_bytes)
        self.hashed: tuple[int, int] | None = None
        self.lines = 0
        self._sha = hashlib.sha256()

    @property
    def sha256(self) -> str:
        return self._sha.hexdigest()

    def __iter__(self) -> Iterator[RangeLines]:
        a, b = self.span
        with open(self.path, "rb") as f:
            start = line_start(f, a)
            end = line_start(f, b) if start < b else start
            self.hashed = (max(a - 1, 0), end)
            self._sha, self.lines = hashlib.sha256(), 0
            f.seek(self.hashed[0])
            at = self.hashed[0]
            while at < start:  # the end of the line before the range: hashed, not owned
                data = f.read(min(1 << 22, start - at))
                if not data:
                    raise ShardError(f"{self.path}: the file changed while it was read")
                self._sha.update(data)
                at += len(data)
            offset, pending = start, b""

            def chunk(length: int) -> RangeLines:
                self.lines += pending.count(b"\n", 0, length) + (pending[length - 1:length] != b"\n")
                return RangeLines(at - start, path=str(self.path), offset=offset, length=length, located=a > 0)

            while at < end:
                block = f.read(min(max(self.chunk_bytes, 1 << 16), end - at))
                if not block:
                    raise ShardError(f"{self.path}: the file changed while it was read (shorter than {end:,} bytes)")
                self._sha.update(block)
                at += len(block)
                pending += block
                if len(pending) >= self.chunk_bytes and b"\n" in block:
                    cut = pending.rfind(b"\n") + 1
                    yield chunk(cut)
                    offset += cut
                    pending = pending[cut:]
            if pending:
                yield chunk(len(pending))


class InputReader:
    """One input — a whole file, through its format's reader, or a share's byte range (``RangeReader``) — read once:
    its chunks, then ``record()``, what the manifest's ``inputs`` say of it (the file's size and mtime as they were
    before reading; the sha256 of what was read)."""

    def __init__(self, f: InputFile, keys: Sequence[str], chunk_bytes: int):
        self.file = f
        self._record = input_record(f.path)
        self._reader = open_reader(f.path, keys, chunk_bytes) if f.span is None else \
            RangeReader(f.path, f.span, chunk_bytes)

    def __iter__(self) -> Iterator[Chunk]:
        return iter(self._reader)

    def record(self) -> dict:
        record = {**self._record, "sha256": self._reader.sha256}
        if self.file.span is not None:
            record.update(range=list(self.file.span), hashed=list(self._reader.hashed), lines=self._reader.lines)
        return record


def open_input(f: InputFile, keys: Sequence[str], chunk_bytes: int) -> InputReader:
    """How the tokenize pipeline reads an input (``InputReader``)."""
    return InputReader(f, keys, chunk_bytes)
