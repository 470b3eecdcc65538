"""The exact C path for Unigram tokenizers (llm-jp-3 and other SentencePiece conversions): keizoku._unigram.

``unigram_spec`` decides from a tokenizers JSON (parsed) whether the C encoder reproduces Hugging Face's ids for
it: model Unigram (any vocabulary, ``unk_id``, ``byte_fallback``), normaliser none or Replace(' ' -> R),
pre-tokenizer Metaspace(R, ``split`` false, any prepend scheme), no truncation or padding. Anything else is
refused with a note saying why, and goes through Hugging Face.

Exactness (see ``_unigram.c``): the C encoder is tokenizers' ``Unigram::encode_optimized`` (forward Viterbi over
the vocabulary's pieces, f64 scores, the first candidate wins a tie, unknown characters at ``min_score - 10``,
fused, then byte fallback) after Metaspace's normalisation. With ``split`` false and no added token in the text,
the whole text is one pre-token whose original offset is 0, so the prepend schemes "first" and "always" act
alike. Added tokens are split out by tokenizers before everything else; a document containing the text of one
(``markers``) goes to Hugging Face instead (``Fallback``), as does one the C encoder cannot do (no ``unk_id``
where one is needed, lone surrogates). keizoku still checks the C path against Hugging Face on probe texts and
on the input's first documents before it publishes anything (``tokenizer.check_fast_path``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

ENGINE = "keizoku._unigram (C; tokenizers for the rest)"

# Text for the check against Hugging Face besides tokenizer.PROBE_TEXTS: what the normalisation, the unknown
# characters and the byte fallback of a Unigram model meet.
PROBE_TEXTS = [
    " leading space", "  two leading spaces", "▁already a meta space", "trailing space ", "tab\tand\nnewline\r\n",
    "\u3000全角スペースで始まる", "絵文字😀🙇\u200d♂️と稀な漢字𠮷𩸽", "<0x41> and <0x0A> as text", "\x00\x01\x7f\ufeff",
    "ｶﾀｶﾅ ① ㍻ Ⅻ ﬁ é e\u0301", "\n", " ", "a",
]


def unigram_spec(cfg: dict) -> tuple[dict | None, str]:
    """The C encoder's arguments for this tokenizers JSON (parsed), or None and why not."""
    model = cfg.get("model") or {}
    if model.get("type") != "Unigram":
        return None, f"model is {model.get('type')}, not Unigram"
    if cfg.get("truncation") or cfg.get("padding"):
        return None, "the tokenizer truncates or pads"
    vocab = model.get("vocab")
    if not isinstance(vocab, list) or not vocab:
        return None, "Unigram vocabulary is not a list of pieces"
    pieces, scores = [], []
    for item in vocab:
        if (not isinstance(item, (list, tuple)) or len(item) != 2 or not isinstance(item[0], str)
                or isinstance(item[1], bool) or not isinstance(item[1], (int, float)) or not math.isfinite(item[1])):
            return None, f"Unigram vocabulary entry {item!r} is not [piece, finite score]"
        pieces.append(item[0])
        scores.append(float(item[1]))
    unk_id = model.get("unk_id")
    if unk_id is not None and (not isinstance(unk_id, int) or not 0 <= unk_id < len(pieces)):
        return None, f"unk_id {unk_id!r} is not a vocabulary id"
    pre = _only(cfg.get("pre_tokenizer"), "pretokenizers")
    if not pre or pre.get("type") != "Metaspace":
        return None, "pre-tokenizer is not Metaspace (the C Unigram path supports Metaspace only)"
    replacement = pre.get("replacement")
    if not isinstance(replacement, str) or len(replacement) != 1:
        return None, "Metaspace replacement is not one character"
    if pre.get("split", True):
        return None, "Metaspace splits on the replacement (split: true); the C Unigram path needs split: false"
    scheme = pre.get("prepend_scheme", "always")
    if pre.get("add_prefix_space") is False:
        scheme = "never"
    if scheme not in ("first", "always", "never"):
        return None, f"Metaspace prepend_scheme {scheme!r} is not known"
    norm = cfg.get("normalizer")
    if norm is not None:
        parts = norm.get("normalizers") if norm.get("type") == "Sequence" else [norm]
        if not isinstance(parts, list) or len(parts) > 1 or (parts and not _is_space_replace(parts[0], replacement)):
            return None, (f"normalizer {_describe(norm)} is not supported by the C Unigram path "
                          f"(only Replace(' ' -> {replacement!r}) or none)")
    markers = []
    for t in cfg.get("added_tokens") or []:
        content = t.get("content") or ""
        if not content:
            continue
        if t.get("normalized") and (" " in content or replacement in content):
            return None, f"added token {content!r} is matched after normalisation and contains a space"
        markers.append(content)
    spec = {"pieces": pieces, "scores": scores, "unk_id": -1 if unk_id is None else unk_id,
            "byte_fallback": bool(model.get("byte_fallback")), "replacement": replacement,
            "prepend": scheme != "never", "markers": sorted(set(markers))}
    return spec, "exact C Unigram path (keizoku._unigram)"


def _only(component: dict | None, key: str) -> dict | None:
    """The one component of ``component``, looking inside a Sequence of one."""
    if component and component.get("type") == "Sequence":
        parts = component.get(key) or []
        return parts[0] if len(parts) == 1 else None
    return component


def _is_space_replace(norm: dict, replacement: str) -> bool:
    return (norm.get("type") == "Replace" and norm.get("pattern") == {"String": " "}
            and norm.get("content") == replacement)


def _describe(norm: dict) -> str:
    if norm.get("type") == "Sequence":
        return "Sequence(" + ", ".join(str(n.get("type")) for n in norm.get("normalizers") or []) + ")"
    return str(norm.get("type"))


def available() -> bool:
    """Whether keizoku._unigram is built (and not switched off by KEIZOKU_NO_C_UNIGRAM)."""
    if os.environ.get("KEIZOKU_NO_C_UNIGRAM"):
        return False
    try:
        from keizoku import _unigram  # noqa: F401
    except ImportError:
        return False
    return True


def build_encoder(spec: dict):
    """The C encoder for ``unigram_spec``'s result; None when the extension is not available."""
    if not available():
        return None
    from keizoku import _unigram

    return _unigram.Encoder(spec["pieces"], spec["scores"], spec["unk_id"], spec["byte_fallback"],
                            spec["replacement"], spec["prepend"], list(spec["markers"]))


class Fallback:
    """Hugging Face's ids for the documents the C encoder hands back; counts them."""

    def __init__(self, hf: Callable[[], object]):
        self._hf = hf  # returns the tokenizers.Tokenizer (built on first use by the caller)
        self.documents = 0

    def __call__(self, text: str) -> list[int]:
        self.documents += 1
        return self._hf().encode(text, add_special_tokens=False).ids


class UnigramEncoder:
    """The C encoder with its fallback: ``encode`` and ``encode_pack`` as ``tokenizer.TextEncoder`` has them."""

    engine = ENGINE

    def __init__(self, c_encoder, hf: Callable[[], object]):
        self.c = c_encoder
        self.fallback = Fallback(hf)

    def encode(self, texts: list[str]) -> list[list[int]]:
        return [ids if (ids := self.c.encode(t)) is not None else self.fallback(t) for t in texts]

    def encode_pack(self, texts: list[str], bos: int | None, eod: int | None) -> tuple[bytes, bytes]:
        """(uint32 ids, int32 lengths) as bytes: Megatron's document rule, as ``tokenizer.pack``."""
        return self.c.encode_pack(texts, -1 if bos is None else bos, -1 if eod is None else eod, self.fallback)


def disagrees(why: str) -> str:
    return f"C Unigram path disagrees with Hugging Face ({why}); using Hugging Face"
