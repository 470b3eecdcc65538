"""Bad input: by default stop at the first problem with path:line; with --on-error skip, count and record."""

from __future__ import annotations

import gzip
import json

import pytest

from conftest import keizoku, write_jsonl
from keizoku.data.indexed import IndexedDatasetReader

GOOD = [{"text": "good one"}, {"text": "good two"}]
# (name, raw line placed as line 3, expected reason in the message, manifest category)
CASES = [
    ("malformed", b'{"text": "unterminated\n', "malformed JSON", "malformed JSON"),
    ("missing", b'{"body": "no text key"}\n', "missing field: 'text'", "missing field"),
    ("null", b'{"text": null}\n', "null field: 'text' is null", "null field"),
    ("number", b'{"text": 42}\n', "not a string: 'text' is a number", "not a string"),
    ("list", b'{"text": ["a", "b"]}\n', "not a string: 'text' is an array", "not a string"),
    ("not_object", b'["text"]\n', "not a JSON object: found an array", "not a JSON object"),
    ("utf8", b'{"text": "caf\xe9"}\n', "invalid UTF-8: byte 0xe9", "invalid UTF-8"),
    ("blank", b"\n", "blank line", "blank line"),
    ("whitespace", b"   \t\n", "blank line", "blank line"),
    ("surrogate", b'{"text": "x\\ud800y", "n": NaN}\n', "unpaired surrogate", "unpaired surrogate"),
]


@pytest.mark.parametrize("name,raw,message,category", CASES, ids=[c[0] for c in CASES])
def test_bad_line_stops_with_path_and_line(tmp_path, tokenizer_dirs, name, raw, message, category):
    src = write_jsonl(tmp_path / "in.jsonl", GOOD, raw_lines=[raw, b'{"text": "after"}\n'])
    proc = keizoku("tokenize", src, "-t", tokenizer_dirs["sample"], "-o", tmp_path / "out", check=False)
    assert proc.returncode == 1
    assert f"error: {src}:3: {message}" in proc.stderr
    assert not (tmp_path / "out/in_text_document.bin").exists()
    assert not (tmp_path / "out/in_text_document.idx").exists()
    assert not (tmp_path / "out/keizoku-manifest.json").exists()
    assert not [p for p in (tmp_path / "out").rglob("*") if ".tmp" in p.name], "staged files left behind"


@pytest.mark.parametrize("name,raw,message,category", CASES, ids=[c[0] for c in CASES])
def test_bad_line_skipped_and_recorded(tmp_path, tokenizer_dirs, name, raw, message, category):
    src = write_jsonl(tmp_path / "in.jsonl.gz", GOOD, raw_lines=[raw, b'{"text": "after"}\n'])
    keizoku("tokenize", src, "-t", tokenizer_dirs["sample"], "-o", tmp_path / "out", "--on-error", "skip", "-q")
    entry = json.loads((tmp_path / "out/keizoku-manifest.json").read_text())["datasets"]["in_text_document"]
    assert entry["documents"] == 3
    assert entry["skipped"]["count"] == 1 and entry["skipped"]["by_reason"] == {category: 1}
    assert entry["skipped"]["examples"][0]["line"] == 3 and message in entry["skipped"]["examples"][0]["reason"]
    assert len(IndexedDatasetReader(tmp_path / "out/in_text_document")) == 3


def test_json_that_megatron_accepts_is_accepted(tmp_path, tokenizer_dirs):
    # NaN and integers beyond 64 bits are valid for Python's json (what preprocess_data.py uses)
    src = write_jsonl(tmp_path / "in.jsonl", [], raw_lines=[b'{"text": "a", "score": NaN}\n',
                                                          b'{"text": "b", "id": 123456789012345678901234567890}\n'])
    keizoku("tokenize", src, "-t", tokenizer_dirs["sample"], "-o", tmp_path / "out", "-q")
    assert len(IndexedDatasetReader(tmp_path / "out/in_text_document")) == 2


@pytest.mark.parametrize("suffix", [".jsonl.gz", ".jsonl.zst"])
def test_truncated_compressed_input(tmp_path, tokenizer_dirs, ja_texts, suffix):
    full = write_jsonl(tmp_path / f"full{suffix}", [{"text": t} for t in ja_texts])
    src = tmp_path / f"cut{suffix}"
    src.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    proc = keizoku("tokenize", src, "-t", tokenizer_dirs["sample"], "-o", tmp_path / "out", check=False)
    assert proc.returncode == 1
    assert f"error: {src}: truncated input" in proc.stderr and "data after line" in proc.stderr
    assert not (tmp_path / "out/cut_text_document.idx").exists()

    keizoku("tokenize", src, "-t", tokenizer_dirs["sample"], "-o", tmp_path / "out", "--on-error", "skip", "-q")
    entry = json.loads((tmp_path / "out/keizoku-manifest.json").read_text())["datasets"]["cut_text_document"]
    assert entry["skipped"]["by_reason"] == {"truncated input": 1}
    kept = entry["documents"]
    assert 0 < kept < len(ja_texts)
    # what was kept is exactly the first `kept` documents
    keizoku("tokenize", full, "-t", tokenizer_dirs["sample"], "-o", tmp_path / "ref", "-q")
    ours, ref = IndexedDatasetReader(tmp_path / "out/cut_text_document"), IndexedDatasetReader(tmp_path / "ref/full_text_document")
    assert all((ours.document(i) == ref.document(i)).all() for i in range(kept))


def test_corrupt_gzip_member(tmp_path, tokenizer_dirs):
    data = bytearray(gzip.compress(b'{"text": "hello"}\n' * 1000))
    data[-6] ^= 0xFF  # breaks the CRC/length trailer
    src = tmp_path / "bad.jsonl.gz"
    src.write_bytes(bytes(data))
    proc = keizoku("tokenize", src, "-t", tokenizer_dirs["sample"], "-o", tmp_path / "out", check=False)
    assert proc.returncode == 1 and "truncated input" in proc.stderr


def test_usage_errors(tmp_path, tokenizer_dirs):
    src = write_jsonl(tmp_path / "in.jsonl", GOOD)
    for args, msg in [
        ((src,), "give exactly one of --output-dir and --output-prefix"),
        ((src, "-o", tmp_path / "o", "--output-prefix", tmp_path / "p"), "give exactly one of"),
        ((tmp_path / "nope.jsonl", "-o", tmp_path / "o"), "no such file or directory"),
        ((tmp_path / "in.txt", "-o", tmp_path / "o"), "unsupported file type"),
        ((str(tmp_path / "*.parquet"), "-o", tmp_path / "o"), "pattern matches no input files"),
    ]:
        (tmp_path / "in.txt").write_text("x")
        proc = keizoku("tokenize", *args, "-t", tokenizer_dirs["sample"], check=False)
        assert proc.returncode == 1 and msg in proc.stderr, (args, proc.stderr)
    proc = keizoku("tokenize", src, "-o", tmp_path / "o", "-t", tmp_path / "no-tokenizer", check=False)
    assert proc.returncode == 1 and "cannot load tokenizer" in proc.stderr


def test_parquet_null_and_missing_column(tmp_path, tokenizer_dirs):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a", None, "c"]}), tmp_path / "n.parquet")
    proc = keizoku("tokenize", tmp_path / "n.parquet", "-t", tokenizer_dirs["sample"], "-o", tmp_path / "o", check=False)
    assert proc.returncode == 1 and f"{tmp_path / 'n.parquet'}:2: null field: column 'text'" in proc.stderr
    proc = keizoku("tokenize", tmp_path / "n.parquet", "-t", tokenizer_dirs["sample"], "-o", tmp_path / "o",
                   "-k", "body", check=False)
    assert proc.returncode == 1 and "no column 'body' (columns: text)" in proc.stderr


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_line_numbers_count_across_chunks_and_files(tmp_path, tokenizer_dirs, suffix):
    """Workers number records within their chunk; the error and the skipped records name the file's own lines."""
    good = [{"text": f"document {i} " + "x" * 200} for i in range(12000)]  # ~2.6 MB: three chunks of 1 MB
    first = write_jsonl(tmp_path / f"a{suffix}", good[:100])
    src = write_jsonl(tmp_path / f"b{suffix}", good, raw_lines=[b"[1]\n", b'{"text": "after"}\n'])
    args = ("-t", tokenizer_dirs["sample"], "--output-prefix", tmp_path / "out/all", "--chunk-mb", "1")
    proc = keizoku("tokenize", first, src, *args, check=False)
    assert proc.returncode == 1 and f"error: {src}:12001: not a JSON object" in proc.stderr, proc.stderr
    keizoku("tokenize", first, src, *args, "--on-error", "skip", "-q")
    entry = json.loads((tmp_path / "out/keizoku-manifest.json").read_text())["datasets"]["all_text_document"]
    assert [(e["path"], e["line"]) for e in entry["skipped"]["examples"]] == [(str(src), 12001)]


def test_lines_read_in_c_are_read_as_python_reads_them():
    """keizoku._bpe reads well-formed JSON lines itself (encode_lines) and defers every other line to
    records.json_texts: what it reads must be exactly json's text, and what it cannot vouch for it must defer."""
    import random

    from keizoku import _bpe
    from keizoku.data.records import json_texts

    deferred = [b'{"text": "x", "text": "y"}', b'{"text": 5}', b'{"txt": "a"}', b"", b"   ", b'{"text": "\\ud800"}',
                b'{"text": "a\x01b"}', b'{"text": "caf\xe9"}', b'{"text": "ok", "n": NaN}', b'{"text": "ok", "n": 01}',
                b'{"text": "ok", "n": 1.}', b'{"text": "ok"} x', b"[1]", b'{"te\\u0078t": "escaped key"}',
                b'\xef\xbb\xbf{"text": "bom"}', b'{"text": "\xed\xa0\x80"}', b'{"text": "\xf4\x90\x80\x80"}',
                b'{"text": "\xe0\x80\xaf"}', b'{"text": "ok", "x": "\\q"}', b'{"text": "ok", "x": tru}',
                b'{"text": "unterminated}', b'{"text": "a"', b'{"text": "ok",}', b'{"text": "ok", "d": ' + b"[" * 70
                + b"]" * 70 + b"}"]
    read = [b'  {"text":"a\\nb\\t\\"q\\"\\\\ \\/ \\u00e9\\u3042\\ud83d\\ude00"}\r', b'{ "text" : "sp" , "b" : [ ] }',
            b'{"id": 1, "text": "x", "meta": {"a": [1, 2.5e-3, -0, true, false, null, {"b": []}]}}',
            b'{"text": "ok", "big": 123456789012345678901234567890}', b'{"a":{"b":{"c":"d"}},"text":""}']
    rng = random.Random(0)
    for _ in range(2000):
        t = "".join(rng.choice(["a", "日", "\n", '"', "\\", "\u3000", "😀", "\x7f", "é", " ", "\t", "/", "\x1f"])
                    for _ in range(rng.randint(0, 30)))
        obj = {"id": rng.randint(0, 10**20), "text": t, "m": {"x": [1.5, None, True]}} if rng.random() < 0.5 else {"text": t}
        read.append(json.dumps(obj, ensure_ascii=rng.random() < 0.5).encode())
    for line in deferred:
        assert _bpe.json_text(line, "text") is None, line
    for line in read:
        texts, reason = json_texts(line, ["text"])
        assert reason is None and _bpe.json_text(line, "text") == texts[0].encode(), line
