"""keizoku._unigram: the exact C path for Unigram tokenizers (llm-jp-3) gives Hugging Face's ids."""

from __future__ import annotations

import copy
import itertools
import json
import random

import numpy as np
import pytest

from conftest import keizoku, write_jsonl

unigram = pytest.importorskip("keizoku.data.unigram")
pytestmark = pytest.mark.skipif(not unigram.available(), reason="keizoku._unigram is not built")


@pytest.fixture(scope="module")
def llmjp(tokenizer_dirs):
    """(parsed tokenizer.json, the C encoder with its HF fallback, the HF tokenizer) for llm-jp-3."""
    from tokenizers import Tokenizer

    path = tokenizer_dirs["llm-jp-3"] / "tokenizer.json"
    cfg = json.loads(path.read_text(encoding="utf-8"))
    spec, note = unigram.unigram_spec(cfg)
    assert spec is not None, note
    hf = Tokenizer.from_file(str(path))
    return cfg, unigram.UnigramEncoder(unigram.build_encoder(spec), lambda: hf), hf


def hf_ids(hf, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)]


def test_samples_equal_hf(llmjp, ja_texts, en_texts):
    _, enc, hf = llmjp
    texts = ja_texts + en_texts
    assert enc.encode(texts) == hf_ids(hf, texts)
    assert enc.fallback.documents == 0  # nothing in the samples needs Hugging Face


def edge_texts(cfg) -> list[str]:
    singles = {p for p, _ in cfg["model"]["vocab"] if len(p) == 1}
    absent = [c for c in "🙇🦜𩸽𠮷鱻靐齉\ue000\U000f0000\u0378\U000e0001" if c not in singles]
    assert len(absent) >= 5  # characters no piece covers: unknown, then byte fallback
    return [
        "", " ", "  ", "   ", "a", " a", "a ", " a ", "a  b   c    d", "▁", "▁a", " ▁a", "▁▁", "\u3000", "\u3000x",
        "x\u3000\u3000y", "\t", "\ttab", "a\tb", "\n", "\n\n", "\na", "a\n", "\r\n", "a\r\nb\r\n", "\r", " \n \n ",
        "日本語の文。\n\n次の段落、　全角スペース。", "😀", "a😀b", "".join(absent), " ".join(absent), absent[0] * 5,
        "x" + "".join(absent) + "日本", "<0x41>", "<0x0A><0xFF>", "<unk", "unk>", "<s", "/s>", "< s>", "<EOD",
        "\x00", "\x00\x01\x02", "\x7f\x80\x9f", "\ufeffBOM", "\ud7ff\ue000\uffff", "e\u0301 ñ ß ﬁ", "ｶﾀｶﾅ①㍻Ⅻ",
    ]


# documents that contain an added token's text go to Hugging Face (it splits them out first)
ADDED = ["<s>", "</s>", "a<s>b", " <s>", "<s> ", "x</s>y<s>", "<unk>", "<EOD>z", "<MASK><PAD><CLS><SEP>",
         "日本<s>語", "<<s>>", "<s", "</s"]


def test_edge_cases_equal_hf(llmjp):
    cfg, enc, hf = llmjp
    texts = edge_texts(cfg) + ADDED
    assert enc.encode(texts) == hf_ids(hf, texts)
    handed_back = [t for t in texts if enc.c.encode(t) is None]
    contents = [t["content"] for t in cfg["added_tokens"]]
    assert handed_back == [t for t in texts if any(c in t for c in contents)]
    assert {"<s>", "a<s>b", "<unk>", "<MASK><PAD><CLS><SEP>"} <= set(handed_back) and "<s" not in handed_back


def test_what_the_edge_cases_exercise(llmjp):
    """The normalisation and unknown-character rules are really met (not merely agreed on)."""
    cfg, enc, _ = llmjp
    vocab = {p: i for i, (p, _) in enumerate(cfg["model"]["vocab"])}
    byte = {b: vocab[f"<0x{b:02X}>"] for b in range(256)}
    assert enc.encode([""]) == [[]]
    assert enc.encode([" a"]) == enc.encode(["a"]) == enc.encode(["▁a"]) == [[vocab["▁a"]]]  # one meta space in front
    assert enc.encode(["  "]) == [[vocab["▁▁"]]]
    assert enc.encode(["\n"]) == [[vocab["▁"], byte[0x0A]]]
    ids = enc.encode(["🙇"])[0]
    assert ids == [vocab["▁"]] + [byte[b] for b in "🙇".encode()]  # unknown: its UTF-8 bytes
    assert enc.encode(["<s>"]) == [[1]] and enc.fallback.documents >= 1


def test_every_code_point_sampled_equals_hf(llmjp):
    """Code points from the whole range (assigned or not, private use, controls) in contexts: prefixes, spaces,
    digits, newlines, repeats."""
    _, enc, hf = llmjp
    rng = random.Random(7)
    cps = [c for c in range(0x110000) if not 0xD800 <= c < 0xE000]
    chars = [chr(c) for c in rng.sample(cps, 3000) + list(range(0x20, 0x7F)) + list(range(0x3000, 0x3100))]
    texts = ["".join(f"a{c}b {c}1{c}\n{c}  {c}!{c}{c}" for c in chars[i:i + 32]) for i in range(0, len(chars), 32)]
    assert enc.encode(texts) == hf_ids(hf, texts)


def test_random_mixtures_of_pieces_equal_hf(llmjp):
    cfg, enc, hf = llmjp
    rng = random.Random(3)
    pieces = [p for p, _ in cfg["model"]["vocab"]]
    extra = [" ", "  ", "\n", "\r\n", "\t", "\u3000", "😀", "🙇\u200d♂️", "𠮷", "é", "e\u0301", "<", "0x41>", "▁", "<s>"]
    texts = ["".join(rng.choice(pieces) if rng.random() < 0.7 else rng.choice(extra)
                     for _ in range(rng.randint(0, 60))) for _ in range(3000)]
    assert enc.encode(texts) == hf_ids(hf, texts)


def test_long_document_and_pack(llmjp, ja_texts, en_texts):
    _, enc, hf = llmjp
    long = "\n\n".join(ja_texts[:150] + en_texts[:50]) + " 😀 " * 1000  # ~0.7 MB, one document
    assert enc.encode([long]) == hf_ids(hf, [long])
    texts = ja_texts[:50] + ["", "a<s>b", " ", "🙇"] + en_texts[:50]
    ids, lengths = enc.encode_pack(texts, 1, 2)
    ref = [[1] + r + [2] for r in hf_ids(hf, texts)]
    assert np.frombuffer(ids, np.uint32).tolist() == [t for r in ref for t in r]
    assert np.frombuffer(lengths, np.int32).tolist() == [len(r) for r in ref]
    ids, lengths = enc.encode_pack(texts, None, 2)  # Megatron's rule: no EOD after an empty document
    assert np.frombuffer(lengths, np.int32).tolist() == [len(r) + 1 if r else 0 for r in hf_ids(hf, texts)]


def test_lone_surrogates_go_to_the_fallback(llmjp):
    _, enc, _ = llmjp
    assert enc.c.encode("a\ud800b") is None


def _unigram_tokenizer(vocab, unk_id, byte_fallback, scheme, replace, added):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    tok = Tokenizer(models.Unigram(vocab, unk_id, byte_fallback))
    if replace:
        tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=False)
    if added:
        tok.add_special_tokens(added)
    return tok


def test_random_unigram_models_with_ties_equal_hf():
    """Small vocabularies with few distinct scores (ties everywhere), with and without byte fallback (some byte
    pieces missing), unk_id anywhere, duplicated pieces, every prepend scheme, with and without the normaliser."""
    rng = random.Random(11)
    alphabet = ["a", "b", "c", "▁", "é", "日", "😀"]
    text_chars = alphabet + [" ", "x", "\n", "\t", "<unk>", "<s>", "ö", "𠮷", "\u3000"]
    checked = 0
    for _ in range(120):
        chars = rng.sample(alphabet, rng.randint(2, len(alphabet)))
        pieces = sorted({"".join(t) for n in (1, 2, 3) for t in itertools.product(chars, repeat=n)
                         if rng.random() < 0.5})
        rng.shuffle(pieces)
        vocab = [("<unk>", 0.0)] + [(p, float(rng.choice([-1, -2, -3, -1.5, -4]))) for p in pieces]
        if rng.random() < 0.5:
            vocab += [(f"<0x{b:02X}>", -5.0) for b in range(256) if rng.random() < 0.97]
        if pieces and rng.random() < 0.3:
            vocab += [(p, float(rng.choice([-1, -2]))) for p in rng.sample(pieces, min(3, len(pieces)))]
        if rng.random() < 0.3:
            rng.shuffle(vocab)
        unk_id = next(i for i, (p, _) in enumerate(vocab) if p == "<unk>")
        added = ["<s>"] if rng.random() < 0.3 else []
        tok = _unigram_tokenizer(vocab, unk_id, rng.random() < 0.6, rng.choice(["first", "always", "never"]),
                                 rng.random() < 0.7, added)
        spec, note = unigram.unigram_spec(json.loads(tok.to_str()))
        assert spec is not None, note
        c = unigram.build_encoder(spec)
        texts = ["".join(rng.choice(text_chars) for _ in range(rng.randint(0, 30))) for _ in range(100)]
        for text, ref in zip(texts, hf_ids(tok, texts)):
            ours = c.encode(text)
            if ours is None:
                assert any(a in text for a in added), text
                continue
            assert ours == ref, (text, vocab)
            checked += 1
    assert checked > 9000


def test_unigram_spec_refuses_what_it_cannot_reproduce(llmjp):
    cfg = llmjp[0]

    def changed(path, value):
        c = node = copy.copy(cfg)  # copies along the path only (the vocabulary is large)
        for key in path[:-1]:
            node[key] = copy.copy(node[key])
            node = node[key]
        node[path[-1]] = value
        return unigram.unigram_spec(c)

    assert unigram.unigram_spec(cfg)[0]["prepend"] is True
    cases = {
        ("pre_tokenizer", "pretokenizers", 0, "split"): (True, "split"),
        ("pre_tokenizer",): ({"type": "ByteLevel", "add_prefix_space": False}, "Metaspace"),
        ("normalizer",): ({"type": "NFKC"}, "normalizer NFKC"),
        ("normalizer", "normalizers"): ([{"type": "NFKC"}, cfg["normalizer"]["normalizers"][0]], "normalizer"),
        ("model", "type"): ("BPE", "not Unigram"),
        ("truncation",): ({"max_length": 8}, "truncates"),
        ("model", "unk_id"): (10 ** 6, "unk_id"),
        ("added_tokens", 0, "normalized"): (True, None),  # "<unk>" has no space: still exact
    }
    for path, (value, why) in cases.items():
        spec, note = changed(path, value)
        if why is None:
            assert spec is not None, note
        else:
            assert spec is None and why in note, (path, note)
    added = cfg["added_tokens"] + [{"id": 99999, "content": "a b", "normalized": True, "special": False}]
    assert changed(("added_tokens",), added)[0] is None
    c = copy.copy(cfg)
    c["normalizer"] = None  # Metaspace replaces the spaces itself: the same
    c["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "never", "split": False}
    spec, _ = unigram.unigram_spec(c)
    assert spec is not None and spec["prepend"] is False


def test_prepare_chooses_unigram_and_checks_it(tokenizer_dirs, ja_texts, monkeypatch):
    from keizoku.data.tokenizer import TextEncoder, check_fast_path, prepare

    prep = prepare(str(tokenizer_dirs["llm-jp-3"]), defer_check=True)
    assert prep.info.backend == "unigram" and prep.fallback.backend == "hf-fast"
    assert prep.info.engine == "keizoku._unigram (C; tokenizers for the rest)"
    assert check_fast_path(prep.spec, ja_texts[:20], prep.info.fingerprint) == (True, "")
    rejected = prep.rejected("text 3, token 7")
    assert rejected.info.backend == "hf-fast" and rejected.info.engine == "tokenizers"
    assert "Unigram" in rejected.info.fast_path_note and rejected.fallback is None

    checked = prepare(str(tokenizer_dirs["llm-jp-3"]), sample_texts=ja_texts[:5])  # checked at once
    assert checked.info.backend == "unigram" and checked.fallback is None
    enc = TextEncoder(checked.spec)
    assert enc.encode(ja_texts[:5]) == enc.encode_reference(ja_texts[:5])

    assert prepare(str(tokenizer_dirs["llm-jp-3"]), fast_bpe=False).info.backend == "hf-fast"
    monkeypatch.setenv("KEIZOKU_NO_C_UNIGRAM", "1")
    off = prepare(str(tokenizer_dirs["llm-jp-3"]))
    assert off.info.backend == "hf-fast" and "not built" in off.info.fast_path_note


def test_tokenize_c_path_equals_hf_path(tmp_path, tokenizer_dirs, ja_texts, en_texts):
    """`keizoku tokenize` with llm-jp-3: the C path (two workers) writes what the Hugging Face path writes."""
    from test_tokenize import assert_same_dataset

    texts = ja_texts[:120] + en_texts[:60] + ["", "  ", "text with <s> and </s> in it", "🙇 emoji", "\r\n"]
    src = write_jsonl(tmp_path / "in.jsonl.gz", [{"text": t} for t in texts])
    proc = keizoku("tokenize", src, "-t", tokenizer_dirs["llm-jp-3"], "--output-prefix", tmp_path / "c/ds",
                   "--workers", "2", "--chunk-mb", "0.1", "--add-bos")
    assert "ids by keizoku._unigram" in proc.stderr + proc.stdout
    keizoku("tokenize", src, "-t", tokenizer_dirs["llm-jp-3"], "--output-prefix", tmp_path / "h/ds", "-j", "1",
            "--add-bos", "--no-fast-bpe", "-q")
    assert_same_dataset(tmp_path / "c/ds_text_document", tmp_path / "h/ds_text_document")
    for side, backend, engine in (("c", "unigram", unigram.ENGINE), ("h", "hf-fast", "tokenizers")):
        entry = json.loads((tmp_path / side / "keizoku-manifest.json").read_text())["datasets"]["ds_text_document"]
        assert (entry["tokenizer"]["backend"], entry["tokenizer"]["engine"]) == (backend, engine)
        assert entry["documents"] == len(texts)
