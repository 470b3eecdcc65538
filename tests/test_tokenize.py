"""`keizoku tokenize`: byte-compatibility with Megatron-LM's preprocess_data.py, formats, workers, resume."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

from conftest import JA_SAMPLE, keizoku, write_jsonl
from keizoku.data.indexed import IndexedDatasetReader, optimal_dtype


def megatron_reference(texts: list[str], tokenizer_dir: Path, prefix: Path, append_eod=True, add_bos=False):
    """What preprocess_data.py (core 0.16, HuggingFaceTokenizer) writes: its Encoder.encode + builder."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), use_fast=False)  # Megatron 0.16's default
    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=optimal_dtype(len(tok)).type)
    for text in texts:
        ids = ([tok.bos_token_id] if add_bos else []) + tok.convert_tokens_to_ids(tok.tokenize(text))
        lens = [len(ids)] if ids else []
        if ids and append_eod:
            ids.append(tok.eos_token_id)
            lens[-1] += 1
        builder.add_document(ids, lens)
    builder.finalize(str(prefix) + ".idx")


def assert_same_dataset(a: Path, b: Path) -> None:
    assert Path(f"{a}.bin").read_bytes() == Path(f"{b}.bin").read_bytes(), f"{a}.bin differs from {b}.bin"
    assert Path(f"{a}.idx").read_bytes() == Path(f"{b}.idx").read_bytes(), f"{a}.idx differs from {b}.idx"


@pytest.mark.parametrize("name", ["llama3.1", "llm-jp-3", "sample"])
def test_byte_identical_to_preprocess_data(tmp_path, tokenizer_dirs, ja_texts, en_texts, name):
    # Japanese and English documents, plus the edge cases: an empty document and special-token text
    texts = ja_texts[:150] + en_texts[:150] + ["", "text with <|end_of_text|> and <s> in it", "  "]
    src = write_jsonl(tmp_path / "in.jsonl.gz", [{"text": t} for t in texts])
    keizoku("tokenize", src, "--tokenizer", tokenizer_dirs[name], "--output-prefix", tmp_path / "k/ds", "-q")
    megatron_reference(texts, tokenizer_dirs[name], tmp_path / "ref")
    assert_same_dataset(tmp_path / "k/ds_text_document", tmp_path / "ref")

    ds = IndexedDataset(str(tmp_path / "k/ds_text_document"))  # megatron-core reads it back
    assert ds.index.dtype == optimal_dtype({"sample": 8002, "llama3.1": 128256, "llm-jp-3": 98452}[name]).type
    assert len(ds.document_indices) == len(texts) + 1
    entry = json.loads((tmp_path / "k/keizoku-manifest.json").read_text())["datasets"]["ds_text_document"]
    assert entry["documents"] == len(texts) and entry["empty_documents"] == 1
    assert entry["tokenizer"]["backend"] == {"llm-jp-3": "unigram"}.get(name, "tiktoken")


def test_add_bos_and_no_eod(tmp_path, tokenizer_dirs, ja_texts):
    texts = ja_texts[:20] + [""]
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in texts])
    keizoku("tokenize", src, "-t", tokenizer_dirs["llama3.1"], "--output-prefix", tmp_path / "bos", "--add-bos", "-q")
    megatron_reference(texts, tokenizer_dirs["llama3.1"], tmp_path / "ref_bos", add_bos=True)
    assert_same_dataset(tmp_path / "bos_text_document", tmp_path / "ref_bos")
    last = IndexedDatasetReader(tmp_path / "bos_text_document").document(len(texts) - 1).tolist()
    assert last == [128000, 128001]  # core >= 0.17 writes [BOS, EOD] for an empty document too

    keizoku("tokenize", src, "-t", tokenizer_dirs["llama3.1"], "--output-prefix", tmp_path / "noeod",
            "--no-append-eod", "-q")
    megatron_reference(texts, tokenizer_dirs["llama3.1"], tmp_path / "ref_noeod", append_eod=False)
    assert_same_dataset(tmp_path / "noeod_text_document", tmp_path / "ref_noeod")


def test_decode_round_trip(tmp_path, tokenizer_dirs, ja_texts):
    from transformers import AutoTokenizer

    src = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in ja_texts[:50]])
    keizoku("tokenize", src, "-t", tokenizer_dirs["llama3.1"], "--output-dir", tmp_path / "out", "-q")
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dirs["llama3.1"]))
    ds = IndexedDatasetReader(tmp_path / "out/in_text_document")
    for i in range(50):
        ids = ds.document(i).tolist()
        assert ids[-1] == tok.eos_token_id
        assert tok.decode(ids[:-1]) == ja_texts[i]


def test_formats_give_identical_output(tmp_path, tokenizer_dirs, ja_texts):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"text": t, "id": i} for i, t in enumerate(ja_texts[:80])]
    for name in ("a.jsonl", "b.jsonl.gz", "c.jsonl.zst"):
        write_jsonl(tmp_path / "in" / name, rows)
    pq.write_table(pa.table({"text": [r["text"] for r in rows]}), tmp_path / "in" / "d.parquet", row_group_size=25)
    keizoku("tokenize", tmp_path / "in", "-t", tokenizer_dirs["sample"], "--output-dir", tmp_path / "out", "-q")
    for stem in ("b", "c", "d"):
        assert_same_dataset(tmp_path / f"out/{stem}_text_document", tmp_path / "out/a_text_document")
    manifest = json.loads((tmp_path / "out/keizoku-manifest.json").read_text())
    assert sorted(manifest["datasets"]) == [f"{s}_text_document" for s in "abcd"]
    a = manifest["datasets"]["a_text_document"]
    assert a["documents"] == 80 and a["tokens"] > 80 and a["dtype"] == "uint16"
    assert a["inputs"][0]["size"] == (tmp_path / "in/a.jsonl").stat().st_size
    assert len(a["inputs"][0]["sha256"]) == 64 and a["tokenizer"]["vocab_size"] == 8002


def _compressed(data: bytes, suffix: str) -> bytes:
    import zstandard

    return {".jsonl": lambda d: d, ".jsonl.gz": gzip.compress,
            ".jsonl.zst": zstandard.ZstdCompressor().compress}[suffix](data)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zst"])
def test_reader_chunks_at_every_boundary(tmp_path, suffix):
    """Every file length (0 bytes, ending inside a line, right after a newline) and chunk size (smaller than a
    line, ending a chunk exactly at the end of the file): whole lines, in order, numbered, nothing lost, no hang."""
    from keizoku.data.readers import Lines, open_reader

    text = b'{"text": "a"}\n{"text": "bb"}\n\n{"text": "' + b"c" * 40 + b'"}\n{"text": "d"}\n{"text": "e"}'
    path = tmp_path / f"in{suffix}"
    for end in range(len(text) + 1):
        path.write_bytes(_compressed(text[:end], suffix))
        for chunk_bytes in (1, 2, 3, 7, 15, 16, 64, 4096):
            chunks = list(open_reader(path, ["text"], chunk_bytes))
            assert all(isinstance(c, Lines) and c.read() and not c.truncated for c in chunks), (end, chunk_bytes)
            assert all((c.span is not None) == (suffix == ".jsonl") for c in chunks)  # uncompressed: file spans
            assert b"".join(c.read() for c in chunks) == text[:end], (end, chunk_bytes)
            assert all(c.read().endswith(b"\n") for c in chunks[:-1]), (end, chunk_bytes)
            numbers = [[line for line, _, _ in c.records(["text"])] for c in chunks]  # from 1 in each chunk
            assert numbers == [list(range(1, len(c.read().splitlines()) + 1)) for c in chunks], (end, chunk_bytes)


def test_empty_input_and_input_ending_at_a_chunk_boundary(tmp_path, tokenizer_dirs):
    """A 0-byte input is a dataset of no documents; an input whose end is the end of a chunk is read to its end."""
    (tmp_path / "empty.jsonl").write_bytes(b"")
    line = b'{"text": "' + b"x" * ((1 << 20) - 13) + b'"}\n'  # exactly 1 MiB: one chunk of --chunk-mb 1
    (tmp_path / "mib.jsonl").write_bytes(line)
    (tmp_path / "long.jsonl").write_bytes(b'{"text": "' + b"y" * (5 << 19) + b'"}\n')  # a line of 2.5 chunks
    keizoku("tokenize", tmp_path / "empty.jsonl", tmp_path / "mib.jsonl", tmp_path / "long.jsonl", "-t",
            tokenizer_dirs["sample"], "-o", tmp_path / "out", "--chunk-mb", "1", "-q", timeout=120)
    datasets = json.loads((tmp_path / "out/keizoku-manifest.json").read_text())["datasets"]
    assert {name: e["documents"] for name, e in datasets.items()} == {
        "empty_text_document": 0, "mib_text_document": 1, "long_text_document": 1}
    empty = IndexedDatasetReader(tmp_path / "out/empty_text_document")  # megatron-core cannot mmap a 0-byte .bin
    assert len(empty) == 0 and empty.bin_path.stat().st_size == 0
    assert datasets["long_text_document"]["tokens"] > datasets["mib_text_document"]["tokens"]


def test_reader_registry():
    """Discovery's suffixes and the reader of a file come from one registry; the longest suffix wins."""
    from keizoku.data import readers

    assert {".jsonl", ".json", ".jsonl.gz", ".jsonl.zst", ".parquet"} <= set(readers.suffixes())
    assert readers.reader_for("a/b.jsonl") is readers.JsonlReader
    assert readers.reader_for("b.json.gz") is readers.GzipJsonlReader
    assert readers.reader_for("b.jsonl.zstd") is readers.ZstdJsonlReader
    assert readers.reader_for("b.parquet") is readers.ParquetReader
    assert readers.input_suffix("x.jsonl.gz") == ".jsonl.gz" and readers.input_suffix("x.txt") is None
    with pytest.raises(readers.InputError, match="unsupported file type"):
        readers.reader_for("x.txt")


def test_workers_equal_single_worker(tmp_path, tokenizer_dirs, ja_texts, en_texts):
    rows = [{"text": t} for t in ja_texts + en_texts]
    src = write_jsonl(tmp_path / "in.jsonl.gz", rows)
    for w in (1, 2):
        keizoku("tokenize", src, "-t", tokenizer_dirs["llama3.1"], "--output-prefix", tmp_path / f"w{w}",
                "--workers", w, "--chunk-mb", "0.05", "-q")  # ~45 chunks: many in flight, reordering possible
    assert_same_dataset(tmp_path / "w1_text_document", tmp_path / "w2_text_document")


def test_prefix_mode_merges_inputs_in_order_and_multiple_keys(tmp_path, tokenizer_dirs):
    write_jsonl(tmp_path / "x.jsonl", [{"text": "first file", "title": "T1"}, {"text": "two", "title": "T2"}])
    write_jsonl(tmp_path / "y.jsonl", [{"text": "second file", "title": "T3"}])
    keizoku("tokenize", tmp_path / "y.jsonl", tmp_path / "x.jsonl", "-t", tokenizer_dirs["sample"],
            "--output-prefix", tmp_path / "out/m", "-k", "text", "-k", "title", "-q")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dirs["sample"]))
    for key, expected in (("text", ["second file", "first file", "two"]), ("title", ["T3", "T1", "T2"])):
        ds = IndexedDatasetReader(tmp_path / f"out/m_{key}_document")
        assert [tok.decode(ds.document(i).tolist()[:-1]) for i in range(len(ds))] == expected


def test_directory_mode_resume_after_failure(tmp_path, tokenizer_dirs, ja_texts):
    """A run that dies part-way keeps finished datasets; the rerun does only the rest."""
    data = tmp_path / "data"
    write_jsonl(data / "a.jsonl", [{"text": t} for t in ja_texts[:30]])
    write_jsonl(data / "sub" / "b.jsonl", [{"text": t} for t in ja_texts[30:60]], raw_lines=[b'{"text": broken\n'])
    write_jsonl(data / "sub" / "c.jsonl.gz", [{"text": t} for t in ja_texts[60:90]])
    out = tmp_path / "out"
    proc = keizoku("tokenize", data, "-t", tokenizer_dirs["sample"], "-o", out, "-j", "1", "-q", check=False)
    assert proc.returncode == 1
    assert f"{data / 'sub' / 'b.jsonl'}:31: malformed JSON" in proc.stderr
    assert (out / "a_text_document.idx").exists()
    assert not (out / "sub/b_text_document.idx").exists() and not (out / "sub/b_text_document.bin").exists()
    assert not [p for p in out.rglob("*") if ".tmp" in p.name], "staged files left behind"
    manifest = json.loads((out / "keizoku-manifest.json").read_text())
    assert list(manifest["datasets"]) == ["a_text_document"]
    a_mtime = (out / "a_text_document.bin").stat().st_mtime_ns

    write_jsonl(data / "sub" / "b.jsonl", [{"text": t} for t in ja_texts[30:60]])  # fix the input
    proc = keizoku("tokenize", data, "-t", tokenizer_dirs["sample"], "-o", out)
    assert "1 of 3 datasets are complete and up to date" in proc.stderr
    assert (out / "a_text_document.bin").stat().st_mtime_ns == a_mtime  # not redone
    manifest = json.loads((out / "keizoku-manifest.json").read_text())
    assert sorted(manifest["datasets"]) == ["a_text_document", "sub/b_text_document", "sub/c_text_document"]

    proc = keizoku("tokenize", data, "-t", tokenizer_dirs["sample"], "-o", out)
    assert "3 of 3 datasets are complete and up to date" in proc.stderr
    os.utime(data / "a.jsonl")  # touched but unchanged: the sha256 says it is still up to date
    proc = keizoku("tokenize", data, "-t", tokenizer_dirs["sample"], "-o", out)
    assert "3 of 3 datasets" in proc.stderr
    write_jsonl(data / "a.jsonl", [{"text": t} for t in ja_texts[:31]])  # changed input: redone
    proc = keizoku("tokenize", data, "-t", tokenizer_dirs["sample"], "-o", out)
    assert "2 of 3 datasets" in proc.stderr
    proc = keizoku("tokenize", data, "-t", tokenizer_dirs["sample"], "-o", out, "--force")
    assert "up to date" not in proc.stderr
    proc = keizoku("tokenize", data, "-t", tokenizer_dirs["sample"], "-o", out, "--add-bos")  # other flags: redo
    assert "up to date" not in proc.stderr


def test_killed_run_leaves_no_complete_looking_output(tmp_path, tokenizer_dirs):
    """SIGKILL mid-run: no .bin/.idx under final names, no manifest entry; the rerun completes."""
    lines = gzip.open(JA_SAMPLE, "rb").read()
    src = tmp_path / "big.jsonl"
    src.write_bytes(lines * 12)  # ~15 MB: several seconds of work on one worker
    out = tmp_path / "out"
    args = [sys.executable, "-m", "keizoku", "tokenize", str(src), "-t", str(tokenizer_dirs["llama3.1"]),
            "-o", str(out), "-j", "1", "-q", "--chunk-mb", "1"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not any(p.stat().st_size for p in out.glob(".tmp*.big_text_document.bin")):  # ids being written
        assert time.time() < deadline and proc.poll() is None, "tokenize finished before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(0.5)  # no worker or checker process outlives the killed run
    left = subprocess.run(["pgrep", "-f", str(out)], capture_output=True, text=True).stdout.split()
    assert not left, f"processes left behind: {left}"
    assert not (out / "big_text_document.bin").exists() and not (out / "big_text_document.idx").exists()
    assert not (out / "keizoku-manifest.json").exists()
    keizoku("tokenize", src, "-t", tokenizer_dirs["llama3.1"], "-o", out, "-q")
    assert len(IndexedDataset(str(out / "big_text_document")).document_indices) == 397 * 12 + 1
    assert not list(out.glob(".tmp*")), "the rerun writes over what the killed run staged, and publishes it"


def test_fast_bpe_path_equals_hf_on_samples(tokenizer_dirs, ja_texts, en_texts):
    from keizoku.data.tokenizer import TextEncoder, prepare

    texts = ja_texts + en_texts + ["<|begin_of_text|>x<|eot_id|> y", "a<|end_of_text|>"]
    prep = prepare(str(tokenizer_dirs["llama3.1"]))
    assert prep.info.backend == "tiktoken" and prep.fallback is None
    enc = TextEncoder(prep.spec)
    assert enc.engine.startswith("keizoku._bpe")  # the C extension is built by the dev install
    assert enc.encode(texts) == enc.encode_reference(texts)
    assert enc.encode(["a<|end_of_text|>"])[0][-1] == 128001  # special tokens in text are recognised


def _random_texts(n: int, seed: int) -> list[str]:
    import random

    rng = random.Random(seed)
    pieces = ["'s", "'T", "'re", "'VE", "'m", "'ll", "'D", "'x", "'", "ſ", "'ſ", " ", "  ", "\t", "\n", "\r\n",
              "\n\n  ", " \n", "\u3000", "\u00a0", "\u2028", "\x85", "\x1c", "123", "4567", "١٢٣", "½", "Ⅻ", "①",
              "hello", "World", "日本語", "カタカナ", "ｶﾀｶﾅ", "한국어", "Ελλάδα", "é", "e\u0301", "ﬁ", "🤖", "👍🏽",
              "!", "?!", "...", "「", "」", "、", "。", "(", "-", "_", "$", "\u0378", "\U000e0001", "\ue000",
              "<|", "|>", "<|end_of_text|>", "\x00", "\x7f", "\ufeff", "\U0001F600"]
    return ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 40))) for _ in range(n)]


def test_c_bpe_equals_hf_on_random_text(tokenizer_dirs):
    """The C pre-tokenizer + BPE against Hugging Face on adversarial mixtures of every character class."""
    from keizoku.data.tokenizer import TextEncoder, prepare

    prep = prepare(str(tokenizer_dirs["llama3.1"]))
    enc = TextEncoder(prep.spec)
    texts = _random_texts(4000, seed=1)
    assert enc.encode(texts) == enc.encode_reference(texts)
    for seed in (2, 3):  # the packed path (what tokenize uses) too, with BOS and EOD
        texts = _random_texts(1000, seed)
        tokens, lengths = enc.encode_pack(texts, np.dtype(np.int32), 128000, 128001)
        ref = [[128000] + ids + [128001] for ids in enc.encode_reference(texts)]
        assert tokens.tolist() == [t for r in ref for t in r] and lengths.tolist() == [len(r) for r in ref]


def test_c_bpe_starting_from_characters_is_exact(tokenizer_dirs):
    """keizoku._bpe starts BPE from whole characters where that cannot change the result (CharInfo in _bpe.c) and
    answers merges of two such "words" from a table: text made of exactly those characters, next to the tokens and
    bytes that make a character unsafe, against tiktoken's byte-level BPE (the same ids as HF, checked above)."""
    import random

    from keizoku.data.tokenizer import TextEncoder, prepare

    enc = TextEncoder(prepare(str(tokenizer_dirs["llama3.1"])).spec)
    assert enc._c.char_count > 3000  # Llama-3: 3,957 BMP characters are one token each
    ranks = enc.spec.ranks
    chars = [t.decode() for t in ranks if 2 <= len(t) <= 3 and len(t.decode("utf-8", "ignore").encode()) == len(t)]
    words = [w for t in ranks if len(t) >= 4 and (w := t.decode("utf-8", "ignore")) and max(map(ord, w)) >= 0x80]
    other = list("abcXYZ 、。「」！？\n\t0123") + ["ー", "ッ", "々", "〜", "é", "ß", "ж", "🤖", "\u3000"]
    rng = random.Random(5)
    texts = ["".join(rng.choice(chars) if r < 0.6 else rng.choice(words) if r < 0.85 else rng.choice(other)
                     for r in (rng.random() for _ in range(rng.randint(1, 60)))) for _ in range(3000)]
    ours = [enc._c.encode(t) for t in texts]  # None: handed to tiktoken (text like "<|", unassigned code points)
    assert sum(ids is None for ids in ours) < 300
    assert [a for a in ours if a is not None] == [enc._tiktoken.encode_ordinary(t) for t, a in zip(texts, ours)
                                                  if a is not None]


def test_c_bpe_character_classes_match_hf(tokenizer_dirs):
    """Every assigned code point, in contexts that exercise each alternative of the Llama-3 pattern."""
    import unicodedata

    from keizoku.data.tokenizer import TextEncoder, prepare

    enc = TextEncoder(prepare(str(tokenizer_dirs["llama3.1"])).spec)
    chars = [chr(c) for c in range(0x110000) if unicodedata.category(chr(c)) not in ("Cn", "Cs")]
    texts = ["".join(f"a{c}b {c}1{c}\n{c}  {c}!" for c in chars[i:i + 64]) for i in range(0, len(chars), 64)]
    ours, ref = enc.encode(texts), enc.encode_reference(texts)
    bad = [i for i, (a, b) in enumerate(zip(ours, ref)) if a != b]
    assert not bad, f"{len(bad)} batches differ, first around {chars[bad[0] * 64]!r}"


def test_fallback_when_merges_are_not_rank_ordered(tmp_path, tokenizer_dirs, ja_texts):
    """A BPE trained by `tokenizers` (merge order != rank order) must not take the tiktoken path."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(ja_texts, trainers.BpeTrainer(vocab_size=3000, special_tokens=["</s>"],
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                         show_progress=False))
    d = tmp_path / "tok"
    d.mkdir()
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                         "eos_token": "</s>"}))
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in ja_texts[:40]])
    keizoku("tokenize", src, "-t", d, "--output-prefix", tmp_path / "o", "-q")
    entry = json.loads((tmp_path / "keizoku-manifest.json").read_text())["datasets"]["o_text_document"]
    assert entry["tokenizer"]["backend"] == "hf-fast"
    megatron_reference(ja_texts[:40], d, tmp_path / "ref")
    assert_same_dataset(tmp_path / "o_text_document", tmp_path / "ref")


def test_direct_loader_matches_autotokenizer(tokenizer_dirs):
    from transformers import AutoTokenizer

    from keizoku.data.tokenizer import load_tokenizer

    for name, d in tokenizer_dirs.items():
        ours, hf = load_tokenizer(str(d)), AutoTokenizer.from_pretrained(str(d))
        assert ours.backend_json is not None and ours.class_name == "PreTrainedTokenizerFast", name
        assert (ours.vocab_size, ours.eos_id, ours.bos_id) == (len(hf), hf.eos_token_id, hf.bos_token_id), name


def test_concurrent_runs_share_one_manifest(tmp_path, tokenizer_dirs, ja_texts):
    """Two jobs writing different shards into one directory (one job per shard) keep each other's entries."""
    for i in range(4):
        write_jsonl(tmp_path / f"in/shard{i}.jsonl", [{"text": t} for t in ja_texts[i * 50:(i + 1) * 50]])
    out = tmp_path / "out"
    procs = [subprocess.Popen([sys.executable, "-m", "keizoku", "tokenize", *[str(tmp_path / f"in/shard{i}.jsonl")
                               for i in shards], "-t", str(tokenizer_dirs["sample"]), "-o", str(out), "-j", "1", "-q"])
             for shards in ((0, 2), (1, 3))]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    manifest = json.loads((out / "keizoku-manifest.json").read_text())
    assert sorted(manifest["datasets"]) == [f"shard{i}_text_document" for i in range(4)]


def test_ids_fingerprint_is_the_tokenizers_however_it_was_loaded(tmp_path, tokenizer_dirs):
    """The file's JSON and transformers' re-serialisation of it (save_pretrained) may differ as text (then their
    tokenizer_fingerprint does); ids_fingerprint, which compares a dataset's tokenizer with a model's, does not, and
    is computed once per tokenizer text (then read from the cache)."""
    from transformers import AutoTokenizer

    from keizoku.data.tokenizer import _cache_dir, ids_fingerprint, load_tokenizer, tokenizer_fingerprint

    AutoTokenizer.from_pretrained(str(tokenizer_dirs["sample"])).save_pretrained(tmp_path / "saved")
    original, saved = load_tokenizer(str(tokenizer_dirs["sample"])), load_tokenizer(str(tmp_path / "saved"))
    assert ids_fingerprint(original) == ids_fingerprint(saved)
    cached = _cache_dir() / f"ids-fingerprint-{tokenizer_fingerprint(original)[:32]}.txt"
    assert cached.read_text() == ids_fingerprint(original)
    other = load_tokenizer(str(tokenizer_dirs["llm-jp-3"]))
    assert ids_fingerprint(other) != ids_fingerprint(original)


def _peak_tree_memory(args: list) -> tuple[int, int]:
    """Run keizoku; (peak of the RSS summed over its process tree, peak of the PSS so summed), in bytes, sampled."""
    import time

    def tree(pid: int) -> list[int]:
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            return [pid]
        return [pid] + [p for c in children for p in tree(int(c))]

    def field(pid: int, name: str, path: str) -> int:
        try:
            return next(int(line.split()[1]) << 10 for line in Path(f"/proc/{pid}/{path}").read_text().splitlines()
                        if line.startswith(name))
        except (OSError, StopIteration):
            return 0

    proc = subprocess.Popen([sys.executable, "-m", "keizoku", *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    rss = pss = 0
    while proc.poll() is None:
        pids = tree(proc.pid)
        rss = max(rss, sum(field(p, "VmRSS:", "status") for p in pids))
        pss = max(pss, sum(field(p, "Pss:", "smaps_rollup") for p in pids))
        time.sleep(0.05)
    assert proc.returncode == 0, proc.stderr.read()
    return rss, pss


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="needs Linux /proc")
def test_memory_does_not_grow_with_the_input(tmp_path, tokenizer_dirs, ja_texts):
    """Peak memory of a 2-worker run is the same for 3 MB and 18 MB of input: chunks in flight are bounded, ids go
    to the file as they come (result slots are given back once written), nothing is kept per document."""
    import random

    rng = random.Random(0)
    docs = [{"text": "".join(rng.choice(ja_texts)[:400] for _ in range(4))} for _ in range(2000)]
    small = write_jsonl(tmp_path / "small.jsonl", docs)
    big = tmp_path / "big.jsonl"
    big.write_bytes(small.read_bytes() * 6)
    peaks = {}
    for src in (small, big):
        peaks[src.name] = _peak_tree_memory(["tokenize", src, "-t", tokenizer_dirs["llama3.1"], "--output-prefix",
                                             tmp_path / src.stem, "--workers", "2", "--chunk-mb", "1", "-q"])
    (rss_small, pss_small), (rss_big, pss_big) = peaks["small.jsonl"], peaks["big.jsonl"]
    assert big.stat().st_size > 5 * small.stat().st_size
    assert pss_big < pss_small + (40 << 20), peaks
    assert rss_big < rss_small + (60 << 20), peaks
