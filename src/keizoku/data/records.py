"""From input records to document texts: what makes a JSON line or a Parquet row a document, and why one is not.

A record gives one text per key (``--text-key``, in the order given). It is *bad input* — stopped at, or with
``--on-error skip`` skipped, counted and recorded in the manifest — when it is

- a blank line; a line that is not UTF-8; a line that is not JSON as Python's ``json`` reads it (what
  Megatron's ``preprocess_data.py`` uses: ``NaN`` and integers beyond 64 bits are JSON here too);
- not a JSON object; an object without a key; a key whose value is null or not a string;
- a text with an unpaired surrogate (a ``\\ud800`` escape), which no UTF-8 tokenizer can take;
- the damaged end of a cut or corrupt compressed stream (``Chunk.truncated``).

A reason reads ``"category: detail"``; the manifest counts skipped records by category.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterator, Sequence

import orjson

Parsed = tuple["tuple[str, ...] | None", "str | None"]  # (texts, None) or (None, reason)
Record = tuple["int | None", "tuple[str, ...] | None", "str | None"]  # (line, texts, reason); line None: the stream


def json_texts(line: bytes, keys: Sequence[str]) -> Parsed:
    """The texts of one JSON line."""
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError as e:
        return _lenient_json_texts(line, keys, e)
    return object_texts(obj, keys)


def object_texts(obj, keys: Sequence[str]) -> Parsed:
    """The texts of one decoded JSON value."""
    if not isinstance(obj, dict):
        return None, f"not a JSON object: found {_describe(obj)}"
    missing = next((k for k in keys if k not in obj), None)
    if missing is not None:
        return None, f"missing field: {missing!r} (expected a string)"
    return field_texts([obj[k] for k in keys], keys)


def field_texts(values: Sequence, keys: Sequence[str], what: str = "") -> Parsed:
    """``values`` (one per key) as texts; ``what`` names a key in a message (``"column "``)."""
    for key, value in zip(keys, values):
        if value is None:
            return None, f"null field: {what}{key!r} is null (expected a string)"
        if not isinstance(value, str):
            return None, f"not a string: {what}{key!r} is {_describe(value)} (expected a string)"
    return tuple(values), None


def _lenient_json_texts(line: bytes, keys: Sequence[str], strict_error: Exception) -> Parsed:
    """A line orjson refused: why, or its texts where Python's json reads it."""
    if not line.strip():
        return None, "blank line"
    try:
        line.decode("utf-8")
    except UnicodeDecodeError as u:
        return None, f"invalid UTF-8: byte 0x{line[u.start]:02x} at offset {u.start} of the line"
    try:
        obj = json.loads(line)
    except ValueError as e:
        return None, f"malformed JSON: {e}" if str(e) else f"malformed JSON: {strict_error}"
    texts, reason = object_texts(obj, keys)
    if reason is None:  # orjson only yields valid str; json can yield lone surrogates (\ud800 escapes)
        reason = _unpaired_surrogate(texts, keys)
    return (None, reason) if reason else (texts, None)


def _unpaired_surrogate(texts: tuple[str, ...], keys: Sequence[str]) -> str | None:
    for key, text in zip(keys, texts):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            return f"unpaired surrogate: {key!r} contains \\u{ord(text[e.start]):04x}"
    return None


def _describe(value) -> str:
    return {dict: "an object", list: "an array", bool: "a boolean", int: "a number", float: "a number"}.get(
        type(value), type(value).__name__)


@dataclass
class ParsedChunk:
    """A chunk's records as texts (parsed where its texts are tokenized: a worker process, or the main one)."""

    texts: list[list[str]]  # one list per key; empty when the chunk has an error (none of it is written)
    text_bytes: int  # input bytes the chunk stands for (``Chunk.text_bytes``)
    skipped: list[tuple[int | None, str]]  # (line, reason) of each bad record skipped; line None: the stream
    error: tuple[int | None, str] | None  # the first bad record, when not skipping
    lines: int  # records in the chunk (lines or rows; lines are numbered from 1 within the chunk)


def parse_chunk(chunk, keys: Sequence[str], skip: bool) -> ParsedChunk:
    """Parse a ``readers.Chunk``: bad records are skipped (``skip``) or the first one is the chunk's error."""
    rows, skipped, error, lines = [], [], None, 0
    for line, texts, reason in _records(chunk, keys):
        lines = line or lines
        if reason is None:
            rows.append(texts)
        elif skip:
            skipped.append((line, reason))
        else:
            error = (line, reason)
            break
    if error:
        texts = [[] for _ in keys]
    elif len(keys) == 1:
        texts = [[r[0] for r in rows]]
    else:
        texts = [[r[k] for r in rows] for k in range(len(keys))]
    return ParsedChunk(texts, chunk.text_bytes, skipped, error, lines)


def _records(chunk, keys: Sequence[str]) -> Iterator[Record]:
    """The chunk's records, then its truncation (a bad record of the stream itself)."""
    yield from chunk.records(keys)
    if chunk.truncated:
        yield None, None, chunk.truncated


def encode_json_lines(chunk, key: str, skip: bool, encode_lines) -> tuple[object, list, tuple | None, int] | None:
    """A chunk of JSON lines with one text key, read and tokenized by ``encode_lines`` (``TextEncoder.encode_lines``:
    keizoku._bpe reads the well-formed lines itself); every line it defers is read here, by ``json_texts``, so bad
    records get the reasons and the skip-or-stop outcome ``parse_chunk`` gives them. (result, skipped, error,
    lines); None when there is no such reader."""
    skipped, error = [], None

    def slow_line(line: bytes, number: int):
        nonlocal error
        texts, reason = json_texts(line, [key])
        if reason is None:
            return texts[0]
        if skip:
            skipped.append((number, reason))
            return None
        error = (number, reason)
        return False

    result = encode_lines(chunk.read(), key, slow_line)
    if result is None:
        return None
    if error is None and chunk.truncated:
        if skip:
            skipped.append((None, chunk.truncated))
        else:
            error = (None, chunk.truncated)
    return result, skipped, error, result[-1]

