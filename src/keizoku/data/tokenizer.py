"""Tokenizers for ``keizoku tokenize``: the Hugging Face tokenizer, and an exact fast path for byte-level BPE.

Ids are defined as Megatron-LM's ``preprocess_data.py`` (core 0.16) computes them with
``--tokenizer-type HuggingFaceTokenizer``: ``tokenizer.convert_tokens_to_ids(tokenizer.tokenize(text))``,
i.e. no special tokens added by the post-processor, but special/added tokens written in the text are
recognised. For a fast tokenizer that equals ``backend.encode(text, add_special_tokens=False).ids``.

Fast path: byte-level BPE tokenizers whose merges are the rank order of their vocabulary (Llama-3,
tiktoken-converted vocabularies, GPT-2 style ones built that way) give the same ids with tiktoken's
rank-based BPE, which is several times faster than ``tokenizers`` on long pre-tokens (Japanese text has
many). We take that path only when (1) the tokenizer's structure is one tiktoken reproduces (no
normaliser or NFC, Split+ByteLevel pre-tokenizer, ``ignore_merges``, no dropout/byte fallback/affixes),
(2) the merges are exactly what rank-based BPE does — merge priority increases with the rank of the
merged token, and every split of a token into two vocabulary tokens is a merge — and (3) the ids agree
with Hugging Face on a probe text and on the first documents of the input. Documents that contain the
text of an added token (``<|eot_id|>``…) go through Hugging Face, which splits those out first.

Unigram tokenizers (llm-jp-3) have an exact C path of their own, keizoku._unigram (``keizoku.data.unigram``),
chosen and checked against Hugging Face the same way (backend "unigram").
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import pickle
import re
import unicodedata
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from keizoku.data import unigram
from keizoku.data.indexed import optimal_dtype
from keizoku.errors import KeizokuError
from keizoku.rundir import write_atomic

# Text that exercises the pre-tokenizer: scripts, digits, contractions, whitespace runs, emoji.
PROBE_TEXTS = [
    "Hello, world! It's 2024-11-28; we'll see 12345 tokens.\n\n  Indented\tline\r\nend  ",
    "日本語のテキスト（例：東京都）では、句読点。「括弧」や全角ＡＢＣ１２３も使われる。",
    "Ｃ言語とPython3.11で書いた　全角スペース　と  半角  スペース",
    "emoji 🤖🚀 mixed 中文 한국어 العربية русский Ελληνικά ñ é ü ß",
    "   leading spaces and trailing newlines\n\n\n",
    "x" * 300 + " " + "ア" * 200,
    "I'M YOU'LL they've she'd WE'RE don't",
    "\u3000\u3000\n\n\u00a0\u2003 mixed unicode spaces",
]


LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# Unicode White_Space (what \s matches in Oniguruma and in Rust's regex)
WHITE_SPACE = [*range(0x09, 0x0E), 0x20, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B), 0x2028, 0x2029, 0x202F,
               0x205F, 0x3000]


def unicode_classes() -> bytes:
    """Per code point: 1 letter (L*), 2 number (N*), 4 White_Space, 8 CR/LF, 16 unassigned (Cn/Cs).

    Input of the C pre-tokenizer (keizoku._bpe); built from Python's unicodedata, cached on disk.
    """
    path = _cache_dir() / f"unicode-classes-{unicodedata.unidata_version}.bin"
    try:
        data = path.read_bytes()
        if len(data) == 0x110000:
            return data
    except OSError:
        pass
    table = bytearray(0x110000)
    category = unicodedata.category
    for cp in range(0x110000):
        c = category(chr(cp))
        table[cp] = 1 if c[0] == "L" else 2 if c[0] == "N" else 16 if c in ("Cn", "Cs") else 0
    for cp in WHITE_SPACE:
        table[cp] |= 4
    table[0x0A] |= 8
    table[0x0D] |= 8
    data = bytes(table)
    _cache_write(path, data)
    return data


@dataclass(frozen=True)
class TokenizerInfo:
    """What the manifest records about a tokenizer."""

    name_or_path: str
    class_name: str
    vocab_size: int
    eos_id: int | None
    bos_id: int | None
    fingerprint: str
    use_fast: bool
    backend: str  # "tiktoken" or "unigram" (exact fast paths), "hf-fast" or "hf-slow"
    fast_path_note: str = ""
    engine: str = ""  # what computes the ids: keizoku._bpe, keizoku._unigram, tiktoken, tokenizers or transformers
    ids_fingerprint: str = ""  # ids_fingerprint(): the same for the same tokenizer however it was loaded

    @property
    def dtype(self) -> np.dtype:
        return optimal_dtype(self.vocab_size)

    def to_json(self) -> dict:
        return {
            "name_or_path": self.name_or_path,
            "class": self.class_name,
            "vocab_size": self.vocab_size,
            "eos_id": self.eos_id,
            "bos_id": self.bos_id,
            "fingerprint": self.fingerprint,
            "ids_fingerprint": self.ids_fingerprint,
            "use_fast": self.use_fast,
            "backend": self.backend,
            "engine": self.engine,
            "dtype": str(self.dtype),
        }


@dataclass
class EncoderSpec:
    """Everything a worker process needs to rebuild the encoder (picklable)."""

    backend: str
    backend_json: str | None = None  # tokenizers JSON, for hf-fast and for added tokens on tiktoken (json_text())
    name_or_path: str | None = None  # for hf-slow
    pattern: str | None = None
    ranks: dict[bytes, int] = field(default_factory=dict)
    nfc: bool = False
    added_tokens: list[str] = field(default_factory=list)
    unigram: dict | None = None  # backend "unigram": unigram.unigram_spec's result
    backend_file: tuple[str, str] | None = None  # (tokenizer.json, its sha256): where json_text() reads it from

    def json_text(self) -> str | None:
        """The tokenizers JSON: ``backend_json``, or — after a start from the prepared cache — read from
        ``backend_file`` the first time it is needed (Hugging Face's tokenizer for a check or a fallback), which keeps
        9-17 MB of JSON out of the memory of every worker that never needs it."""
        if self.backend_json is None and self.backend_file is not None:
            path, digest = self.backend_file
            data = Path(path).read_bytes()
            if hashlib.sha256(data).hexdigest() != digest:
                raise KeizokuError(f"{path} changed while tokenizing with it; run again")
            self.backend_json = _as_read_text(data.decode("utf-8"))
        return self.backend_json


class TextEncoder:
    """Turns a list of texts into id lists; built once per worker process."""

    def __init__(self, spec: EncoderSpec, hf=None, slow=None):
        self.spec = spec
        self._hf = hf
        self._slow = slow
        self._core_bpe = None
        self._c = None
        self._added = None
        self._added_prefix = ""
        self._unigram = None
        if spec.backend == "unigram" and (c := unigram.build_encoder(spec.unigram)) is not None:
            self._unigram = unigram.UnigramEncoder(c, lambda: self.hf)
        if spec.backend == "hf-slow" and slow is None:
            from transformers import AutoTokenizer

            self._slow = AutoTokenizer.from_pretrained(spec.name_or_path, use_fast=False)
        if spec.backend == "tiktoken":
            if spec.added_tokens:
                alternatives = sorted(spec.added_tokens, key=len, reverse=True)
                self._added = re.compile("|".join(re.escape(t) for t in alternatives))
                self._added_prefix = os.path.commonprefix(spec.added_tokens)
            self._c = _c_encoder(spec, self._added_prefix)

    @property
    def engine(self) -> str:
        """What actually encodes: keizoku._bpe (C), keizoku._unigram (C), tiktoken, tokenizers or transformers."""
        if self._unigram is not None:
            return self._unigram.engine
        if self._c is not None:
            return "keizoku._bpe (C; tiktoken for the rest)"
        return {"tiktoken": "tiktoken", "hf-fast": "tokenizers", "hf-slow": "transformers",
                "unigram": "tokenizers"}[self.spec.backend]

    def encode_pack(self, texts: list[str], dtype: np.dtype, bos: int | None,
                    eod: int | None) -> tuple[np.ndarray, np.ndarray]:
        """All documents' ids concatenated, and each document's length (Megatron's document rule:
        [bos] + ids, then eod when that is non-empty)."""
        if self._unigram is not None:
            ids, lengths = self._unigram.encode_pack(texts, bos, eod)
            return np.frombuffer(ids, dtype=np.uint32).astype(dtype, copy=False), np.frombuffer(lengths, dtype=np.int32)
        if self._c is not None:
            ids, lengths = self._c.encode_pack(texts, -1 if bos is None else bos, -1 if eod is None else eod,
                                               self._encode_tiktoken)
            return np.frombuffer(ids, dtype=np.uint32).astype(dtype, copy=False), np.frombuffer(lengths, dtype=np.int32)
        return pack(self.encode(texts), dtype, bos, eod)

    def encode_lines(self, data: bytes, key: str, dtype: np.dtype, bos: int | None, eod: int | None,
                     slow_line) -> tuple[np.ndarray, np.ndarray, int] | None:
        """JSON lines read and tokenized in C (keizoku._bpe.encode_lines: no Python str per document), the lines it
        defers given to ``slow_line(line, number) -> text | None | False``; None where there is no C path."""
        if self._c is None:
            return None
        ids, lengths, lines = self._c.encode_lines(data, key, -1 if bos is None else bos, -1 if eod is None else eod,
                                                   self._encode_tiktoken, slow_line)
        return np.frombuffer(ids, dtype=np.uint32).astype(dtype, copy=False), np.frombuffer(lengths, dtype=np.int32), lines

    @property
    def _tiktoken(self):
        """tiktoken's encoder, built on first use (~0.1 s): with the C path, only documents it hands back need it."""
        if self._core_bpe is None:
            import tiktoken

            self._core_bpe = tiktoken.Encoding("keizoku-bpe", pat_str=self.spec.pattern,
                                               mergeable_ranks=self.spec.ranks, special_tokens={})._core_bpe
        return self._core_bpe

    @property
    def hf(self):
        """The Rust tokenizer, built on first use (the tiktoken path needs it only for added-token text)."""
        if self._hf is None:
            from tokenizers import Tokenizer

            self._hf = Tokenizer.from_str(self.spec.json_text())
        return self._hf

    def encode(self, texts: list[str]) -> list[list[int]]:
        if self._unigram is not None:
            return self._unigram.encode(texts)
        if self._c is not None:
            return [ids if (ids := self._c.encode(t)) is not None else self._encode_tiktoken(t) for t in texts]
        if self.spec.backend == "tiktoken":
            return [self._encode_tiktoken(t) for t in texts]
        if self._slow is not None:
            return [self._slow.convert_tokens_to_ids(self._slow.tokenize(t)) for t in texts]
        return self._encode_hf(texts)

    def encode_reference(self, texts: list[str]) -> list[list[int]]:
        """Hugging Face's ids (what the fast path must reproduce)."""
        return self._encode_hf(texts)

    def _encode_hf(self, texts: list[str]) -> list[list[int]]:
        batch = getattr(self.hf, "encode_batch_fast", self.hf.encode_batch)
        return [e.ids for e in batch(texts, add_special_tokens=False)]

    def _encode_tiktoken(self, text: str) -> list[int]:
        if self._added is not None and self._added_prefix in text and self._added.search(text):
            return self.hf.encode(text, add_special_tokens=False).ids
        if self.spec.nfc:
            text = unicodedata.normalize("NFC", text)
        return self._tiktoken.encode_ordinary(text)


@dataclass
class LoadedTokenizer:
    """A Hugging Face tokenizer reduced to what tokenizing needs."""

    name_or_path: str
    class_name: str
    vocab_size: int  # len(tokenizer): the vocabulary including added tokens (Megatron's vocab_size)
    eos_id: int | None
    bos_id: int | None
    backend_json: str | None  # the fast tokenizer's tokenizers JSON; None for a slow tokenizer
    slow: object | None = None  # the transformers tokenizer when there is no fast one
    backend_cfg: dict | None = None  # backend_json parsed, when it already was


def pack(ids: list[list[int]], dtype: np.dtype, bos: int | None, eod: int | None) -> tuple[np.ndarray, np.ndarray]:
    flat: list[int] = []
    lengths = np.empty(len(ids), dtype=np.int32)
    for i, doc in enumerate(ids):
        n = len(doc)
        if bos is not None:
            flat.append(bos)
            n += 1
        if n:
            flat.extend(doc)
            if eod is not None:
                flat.append(eod)
                n += 1
        lengths[i] = n
    return np.fromiter(flat, dtype=dtype, count=len(flat)), lengths


def _c_encoder(spec: EncoderSpec, added_prefix: str):
    """keizoku._bpe for the Llama-3 pattern, when the extension is built; None otherwise."""
    if spec.pattern != LLAMA3_PATTERN or spec.nfc or (spec.added_tokens and not added_prefix):
        return None
    _bpe = _c_bpe_module()
    return None if _bpe is None else _bpe.Encoder(spec.ranks, unicode_classes(), added_prefix.encode())


def _c_bpe_module():
    """keizoku._bpe, unless it is not built or KEIZOKU_NO_C_BPE is set."""
    if os.environ.get("KEIZOKU_NO_C_BPE"):
        return None
    try:
        from keizoku import _bpe
    except ImportError:
        return None
    return _bpe


def load_tokenizer(name_or_path: str, use_fast: bool = True) -> LoadedTokenizer:
    """Load a tokenizer as ``AutoTokenizer.from_pretrained`` would.

    A local directory whose ``tokenizer_config.json`` names the generic ``PreTrainedTokenizerFast``
    class (Llama-3, llm-jp-3 and most converted tokenizers) is exactly its ``tokenizer.json``; we read
    that file directly, which skips importing transformers and torch (~4 s) and building the Rust
    tokenizer (~0.6 s) until something needs it. Anything else goes through ``AutoTokenizer``.
    """
    direct = _load_direct(Path(name_or_path)) if use_fast else None
    if direct is not None:
        return direct
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, use_fast=use_fast)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds; all mean "cannot load"
        raise ValueError(f"cannot load tokenizer {name_or_path!r}: {e}") from e
    fast = bool(getattr(tok, "is_fast", False))
    return LoadedTokenizer(str(name_or_path), type(tok).__name__, len(tok), tok.eos_token_id, tok.bos_token_id,
                           tok.backend_tokenizer.to_str() if fast else None, None if fast else tok)


def _load_direct(path: Path) -> LoadedTokenizer | None:
    if not (path / "tokenizer.json").is_file() or not (path / "tokenizer_config.json").is_file():
        return None
    try:
        config = json.loads((path / "tokenizer_config.json").read_text())
        text = (path / "tokenizer.json").read_text(encoding="utf-8")
        with _no_gc():
            cfg = json.loads(text)
    except ValueError:
        return None
    if config.get("tokenizer_class") != "PreTrainedTokenizerFast" or config.get("auto_map"):
        return None
    vocab = _token_ids(cfg)
    if vocab is None:
        return None
    for tid, added in (config.get("added_tokens_decoder") or {}).items():
        if vocab.get(added.get("content", "")) != int(tid):
            return None  # tokens added outside tokenizer.json: let transformers merge them
    special_map = {}
    if (path / "special_tokens_map.json").is_file():
        special_map = json.loads((path / "special_tokens_map.json").read_text())

    def token_id(name: str) -> int | None:
        value = config.get(name, special_map.get(name))
        if isinstance(value, dict):
            value = value.get("content")
        return vocab.get(value) if value else None

    return LoadedTokenizer(str(path), "PreTrainedTokenizerFast", len(vocab), token_id("eos_token"),
                           token_id("bos_token"), text, backend_cfg=cfg)


def _token_ids(cfg: dict) -> dict[str, int] | None:
    """token -> id over the model vocabulary and the added tokens, as ``Tokenizer.get_vocab(True)``."""
    model = cfg.get("model") or {}
    vocab = model.get("vocab")
    if isinstance(vocab, dict):
        ids = dict(vocab)
    elif isinstance(vocab, list) and model.get("type") == "Unigram":
        ids = {piece: i for i, (piece, _score) in enumerate(vocab)}
    else:
        return None
    for t in cfg.get("added_tokens") or []:
        ids[t["content"]] = t["id"]
    return ids


def tokenizer_fingerprint(tok: LoadedTokenizer) -> str:
    """sha256 over what defines the ids: the tokenizers JSON (fast) or vocabulary (slow), and special ids."""
    h = hashlib.sha256()
    if tok.backend_json is not None:
        h.update(tok.backend_json.encode())
    else:
        h.update(type(tok.slow).__name__.encode())
        h.update(json.dumps(sorted(tok.slow.get_vocab().items()), ensure_ascii=False).encode())
    h.update(json.dumps([tok.bos_id, tok.eos_id, tok.vocab_size]).encode())
    return h.hexdigest()


def ids_fingerprint(tok: LoadedTokenizer) -> str:
    """sha256 over what defines the ids, independent of how the tokenizer was loaded: ``tokenizer_fingerprint``
    hashes the JSON text as read (the file's, or transformers' re-serialisation of it, which differ for one
    tokenizer), this one the parsed JSON written canonically. Compares a dataset's tokenizer with a model's
    (``keizoku.preflight``); the manifest keeps both (``tokenizer_fingerprint`` decides whether data is current)."""
    if tok.backend_json is None:
        return tokenizer_fingerprint(tok)
    # writing 9 MB of JSON canonically takes ~0.7 s (Llama-3): once per tokenizer text, then from the cache
    cache = _cache_dir() / f"ids-fingerprint-{tokenizer_fingerprint(tok)[:32]}.txt"
    try:
        found = cache.read_text()
        if len(found) == 64:
            return found
    except OSError:
        pass
    with _no_gc():
        parsed = tok.backend_cfg if tok.backend_cfg is not None else json.loads(tok.backend_json)
        h = hashlib.sha256(json.dumps(parsed, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode())
    h.update(json.dumps([tok.bos_id, tok.eos_id, tok.vocab_size]).encode())
    _cache_write(cache, h.hexdigest())
    return h.hexdigest()


@contextmanager
def _no_gc():
    """Python's cycle collector off while a large JSON document is parsed or written: its millions of new objects
    trigger collections that find nothing to free (9% of a short tokenize run)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


@dataclass
class Prepared:
    """The tokenizer, the encoder to use, and — while the fast path is not yet verified — the fallback."""

    info: TokenizerInfo
    spec: EncoderSpec
    fallback: EncoderSpec | None = None  # set when ``spec`` (tiktoken) still awaits check_fast_path()

    def rejected(self, why: str) -> "Prepared":
        """The Hugging Face path, after check_fast_path() said no."""
        note = unigram.disagrees(why) if self.spec.backend == "unigram" else _disagrees(why)
        info = replace(self.info, backend=self.fallback.backend, fast_path_note=note,
                       engine=encoder_for(self.fallback).engine)
        return Prepared(info, self.fallback)


def prepare(name_or_path: str, use_fast: bool = True, fast_bpe: bool = True,
            sample_texts: list[str] | None = None, defer_check: bool = False) -> Prepared:
    """Load the tokenizer and choose the encoder.

    The fast path is taken only once ``check_fast_path`` agrees. With ``defer_check`` that check is left
    to the caller (``keizoku tokenize`` runs it in a worker while the others start tokenizing, and
    publishes nothing before it passes); ``Prepared.fallback`` is then the encoder to use if it fails.
    """
    cache = _prepared_cache(name_or_path, use_fast, fast_bpe) if defer_check else None
    if cache is not None and (found := _read_prepared(*cache)) is not None:
        info, spec, fallback = found
        return Prepared(replace(info, name_or_path=str(name_or_path), engine=encoder_for(spec).engine), spec, fallback)
    tok = load_tokenizer(name_or_path, use_fast=use_fast)
    fingerprint = tokenizer_fingerprint(tok)
    spec, fallback, note = _choose_encoder(tok, name_or_path, fast_bpe, fingerprint,
                                           None if defer_check else sample_texts or [])
    info = TokenizerInfo(
        name_or_path=str(name_or_path),
        class_name=tok.class_name,
        vocab_size=tok.vocab_size,
        eos_id=tok.eos_id,
        bos_id=tok.bos_id,
        fingerprint=fingerprint,
        ids_fingerprint=ids_fingerprint(tok),
        use_fast=tok.backend_json is not None,
        backend=spec.backend,
        fast_path_note=note,
        engine=encoder_for(spec).engine,
    )
    if cache is not None:
        unloaded = [replace(x, backend_json=None) if x is not None else None for x in (spec, fallback)]
        _cache_write(cache[0], pickle.dumps((info, *unloaded), protocol=pickle.HIGHEST_PROTOCOL))
    return Prepared(info, spec, fallback)


_PREPARED_FORMAT = 2  # bump when what prepare() caches changes shape


def _prepared_cache(name_or_path: str, use_fast: bool, fast_bpe: bool) -> tuple[Path, tuple[str, str]] | None:
    """(where prepare()'s result for this tokenizer is cached, (its tokenizer.json, that file's sha256)) for a local
    tokenizer directory:
    parsing 9-17 MB of JSON and building the rank table take most of a second at every start, and each
    ``keizoku tokenize`` of a campaign's thousands of files starts once. Keyed by the tokenizer's files, this
    code (tokenizer.py, unigram.py) and which C encoders load, so that a changed file or build is a miss."""
    d = Path(name_or_path)
    if not use_fast or not (d / "tokenizer.json").is_file() or not (d / "tokenizer_config.json").is_file():
        return None
    h = hashlib.sha256()
    try:
        files = [(d / n).read_bytes() if (d / n).is_file() else b""
                 for n in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")]
        files += [Path(__file__).read_bytes(), Path(unigram.__file__).read_bytes()]
    except OSError:
        return None
    for data in files:
        h.update(len(data).to_bytes(8, "little") + data)
    h.update(json.dumps([_PREPARED_FORMAT, fast_bpe, _c_bpe_module() is not None, unigram.available()]).encode())
    source = (str((d / "tokenizer.json").absolute()), hashlib.sha256(files[0]).hexdigest())
    return _cache_dir() / f"prepared-{h.hexdigest()[:32]}.pickle", source


def _as_read_text(text: str) -> str:
    """``text`` as Path.read_text (what load_tokenizer reads, and what fingerprints hash) gives it."""
    return text.replace("\r\n", "\n").replace("\r", "\n") if "\r" in text else text


def _read_prepared(path: Path, source: tuple[str, str]) -> tuple[TokenizerInfo, EncoderSpec, EncoderSpec | None] | None:
    try:
        data = path.read_bytes()
        with _no_gc():
            info, spec, fallback = pickle.loads(data)
    except (OSError, ValueError, TypeError, AttributeError, EOFError, pickle.UnpicklingError):
        return None
    loaded = [replace(x, backend_file=source) if x is not None and x.backend != "hf-slow" else x for x in (spec, fallback)]
    return info, *loaded


def _choose_encoder(tok: LoadedTokenizer, name_or_path: str, fast_bpe: bool, fingerprint: str,
                    check_on: list[str] | None) -> tuple[EncoderSpec, EncoderSpec | None, str]:
    """(the encoder, the one to fall back to while it is unchecked, a note on the choice). ``check_on``: the
    texts to check the fast path on now; None leaves the check to the caller."""
    if tok.backend_json is None:
        spec = EncoderSpec(backend="hf-slow", name_or_path=name_or_path)
        encoder_for(spec, slow=tok.slow)
        return spec, None, "slow (Python) tokenizer"
    hf = EncoderSpec(backend="hf-fast", backend_json=tok.backend_json)
    if not fast_bpe:
        return hf, None, "fast BPE path disabled (--no-fast-bpe)"
    fast, note = _tiktoken_spec(tok.backend_json, tok.backend_cfg)
    if fast is None and "Unigram" in note:
        return _choose_unigram(tok, hf, fingerprint, check_on)
    if fast is None:
        return hf, None, note
    if check_on is None:
        return fast, hf, "exact fast BPE path; checking it against Hugging Face alongside"
    ok, why = check_fast_path(fast, check_on, fingerprint)
    return (fast, None, note) if ok else (hf, None, _disagrees(why))


def _choose_unigram(tok: LoadedTokenizer, hf: EncoderSpec, fingerprint: str,
                    check_on: list[str] | None) -> tuple[EncoderSpec, EncoderSpec | None, str]:
    """_choose_encoder for a Unigram model: the C encoder (keizoku._unigram) when it reproduces this tokenizer."""
    with _no_gc():
        cfg = tok.backend_cfg if tok.backend_cfg is not None else json.loads(tok.backend_json)
    data, note = unigram.unigram_spec(cfg)
    if data is None:
        return hf, None, note
    if not unigram.available():
        return hf, None, "keizoku._unigram is not built (or KEIZOKU_NO_C_UNIGRAM is set)"
    fast = EncoderSpec(backend="unigram", backend_json=tok.backend_json, unigram=data)
    if check_on is None:
        return fast, hf, "exact C Unigram path; checking it against Hugging Face alongside"
    ok, why = check_fast_path(fast, check_on, fingerprint)
    return (fast, None, note) if ok else (hf, None, unigram.disagrees(why))


def _disagrees(why: str) -> str:
    return f"fast BPE path disagrees with Hugging Face ({why}); using Hugging Face"


def check_fast_path(spec: EncoderSpec, sample_texts: list[str], fingerprint: str) -> tuple[bool, str]:
    """Whether the tiktoken encoder gives Hugging Face's ids: merge order, then a probe and sample texts.
    The C Unigram encoder: the probe (with Unigram's own) and the sample texts."""
    if spec.backend == "unigram":
        return verify(spec, PROBE_TEXTS + unigram.PROBE_TEXTS + list(sample_texts))
    ok, why = _merges_are_rank_order(spec, fingerprint)
    if not ok:
        return False, why
    return verify(spec, PROBE_TEXTS + list(sample_texts))


_LAST_ENCODER: TextEncoder | None = None


def encoder_for(spec: EncoderSpec, hf=None, slow=None) -> TextEncoder:
    """The encoder for ``spec``, reusing the last one built (building takes about a second).

    ``hf``/``slow`` pass an already loaded tokenizer instead of rebuilding it from the spec.
    """
    global _LAST_ENCODER
    if _LAST_ENCODER is None or _LAST_ENCODER.spec is not spec:
        _LAST_ENCODER = TextEncoder(spec, hf=hf, slow=slow)
    return _LAST_ENCODER


def verify(spec: EncoderSpec, texts: list[str]) -> tuple[bool, str]:
    enc = encoder_for(spec)
    fast, ref = enc.encode(texts), enc.encode_reference(texts)
    for i, (a, b) in enumerate(zip(fast, ref)):
        if a != b:
            k = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            return False, f"text {i}, token {k}"
    return True, ""


def _byte_decoder() -> dict[str, int]:
    # GPT-2's reversible byte <-> unicode map used by ByteLevel pre-tokenizers
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def _tiktoken_spec(backend_json: str, cfg: dict | None = None) -> tuple[EncoderSpec | None, str]:
    """An EncoderSpec for tiktoken if this tokenizer is byte-level BPE of a shape tiktoken reproduces."""
    if cfg is None:
        with _no_gc():
            cfg = json.loads(backend_json)
    model = cfg.get("model") or {}
    if model.get("type") != "BPE":
        return None, f"model is {model.get('type')}, not byte-level BPE"
    if model.get("dropout") or model.get("byte_fallback") or model.get("continuing_subword_prefix") \
            or model.get("end_of_word_suffix"):
        return None, "BPE uses dropout, byte fallback or sub-word affixes"
    if not model.get("ignore_merges"):
        return None, "BPE does not set ignore_merges (tiktoken always emits whole-word vocabulary hits)"
    norm = cfg.get("normalizer")
    if norm is not None and norm.get("type") != "NFC":
        return None, f"normalizer {norm.get('type')} is not supported by the fast path"
    pattern = _byte_level_pattern(cfg.get("pre_tokenizer"))
    if pattern is None:
        return None, "pre-tokenizer is not Split(regex)+ByteLevel"
    to_latin1 = str.maketrans({c: chr(b) for c, b in _byte_decoder().items()})
    vocab: dict[str, int] = model["vocab"]
    try:
        ranks = {tok.translate(to_latin1).encode("latin-1"): i for tok, i in vocab.items()}
    except UnicodeEncodeError:
        return None, "vocabulary is not byte-level"
    if len(ranks) != len(vocab):
        return None, "vocabulary maps two tokens to the same bytes"
    added = [t["content"] for t in cfg.get("added_tokens") or [] if t.get("content")]
    return EncoderSpec(backend="tiktoken", backend_json=backend_json, pattern=pattern, ranks=ranks,
                       nfc=norm is not None, added_tokens=added), "exact fast BPE path (tiktoken)"


def _byte_level_pattern(pre) -> str | None:
    if pre is None:
        return None
    if pre.get("type") == "ByteLevel":
        return GPT2_PATTERN if pre.get("use_regex", True) and not pre.get("add_prefix_space") else None
    if pre.get("type") != "Sequence":
        return None
    parts = pre.get("pretokenizers") or []
    if len(parts) != 2:
        return None
    split, bl = parts
    if (split.get("type") != "Split" or split.get("behavior") != "Isolated" or split.get("invert")
            or "Regex" not in (split.get("pattern") or {})):
        return None
    if bl.get("type") != "ByteLevel" or bl.get("use_regex", True) or bl.get("add_prefix_space"):
        return None
    return split["pattern"]["Regex"]


def _merges_are_rank_order(spec: EncoderSpec, fingerprint: str) -> tuple[bool, str]:
    """True when HF's merge-priority BPE equals tiktoken's rank-based BPE for this vocabulary.

    Needs: merge priority non-decreasing in the merged token's rank, and every split of a token into
    two vocabulary tokens listed as a merge (tiktoken merges any adjacent pair whose concatenation is
    a token). Checked on the byte-level strings (one character per byte). The result is cached per
    tokenizer fingerprint because the check takes a second or two on a 128k vocabulary.
    """
    cache = _cache_dir() / f"bpe-rank-order-{fingerprint[:32]}.json"
    try:
        cached = json.loads(cache.read_text())
        return cached["ok"], cached["why"]
    except (OSError, ValueError, KeyError):
        pass
    with _no_gc():
        model = json.loads(spec.json_text())["model"]
    why = _rank_order_violation(model["vocab"], model.get("merges") or [])
    _cache_write(cache, json.dumps({"ok": not why, "why": why}))
    return not why, why


def _rank_order_violation(vocab: dict[str, int], merges: list) -> str:
    """Why merge-priority BPE is not rank-based BPE over this vocabulary; "" when it is."""
    pairs, last = set(), -1
    for i, m in enumerate(merges):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        rank = vocab.get(a + b)
        if rank is None or a not in vocab or b not in vocab:
            return f"merge {i} ({a!r}, {b!r}) is not between vocabulary tokens"
        if rank < last:
            return f"merge {i} is out of rank order"
        last = rank
        pairs.add((a, b))
    for tok in vocab:
        for k in range(1, len(tok)):
            left, right = tok[:k], tok[k:]
            if left in vocab and right in vocab and (left, right) not in pairs:
                return f"token {tok!r} splits into vocabulary tokens that are not a merge"
    return ""


def _cache_write(path: Path, data: str | bytes) -> None:
    """Keep ``data`` in the cache; a cache that cannot be written only costs time."""
    try:
        write_atomic(path, data)
    except OSError:
        pass


def _cache_dir() -> Path:
    base = os.environ.get("KEIZOKU_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "keizoku")
    return Path(base)
