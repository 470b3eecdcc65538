"""Build keizoku's bundled sample tokenizer (src/keizoku/assets/tokenizer/) from the bundled text.

A small byte-level BPE in the Llama-3 style — the same split regex, ByteLevel bytes, ``ignore_merges``,
``<|begin_of_text|>``/``<|end_of_text|>`` — trained on the bundled Japanese and English samples. Its
merges are then rewritten in rank order (every split of a token into two tokens, ordered by the rank of
the result), which is what a tiktoken-converted tokenizer such as Llama-3's looks like, so that the
exact fast BPE path of ``keizoku tokenize`` applies to it. The vocabulary (8,000 + 2 special tokens) is
small enough for the tiny quickstart model and keeps ids in uint16.

Run from the repository root:  .venv/bin/python tools/build_sample_tokenizer.py
"""

import gzip
import json
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "src" / "keizoku" / "assets"
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
VOCAB = 8000
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"


def texts():
    for name in ("ja_sample.jsonl.gz", "en_sample.jsonl.gz"):
        with gzip.open(ASSETS / "data" / name, "rt", encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)["text"]


def pre_tokenizer():
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def main() -> None:
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts(), trainer)
    trained = json.loads(tok.to_str())["model"]
    # order tokens by the step they were created at (bytes first), then list every two-token split
    order = sorted(trained["vocab"].items(), key=lambda kv: kv[1])
    vocab = {t: i for i, (t, _) in enumerate(order)}
    merges = []
    for t, rank in vocab.items():
        for k in range(1, len(t)):
            if t[:k] in vocab and t[k:] in vocab:
                merges.append((rank, vocab[t[:k]], vocab[t[k:]], t[:k], t[k:]))
    merges.sort()
    model = models.BPE(vocab=vocab, merges=[(a, b) for *_, a, b in merges], ignore_merges=True)
    out = Tokenizer(model)
    out.pre_tokenizer = pre_tokenizer()
    out.decoder = decoders.ByteLevel()
    out.add_special_tokens([BOS, EOS])
    out.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B:1", special_tokens=[(BOS, out.token_to_id(BOS))])
    dest = ASSETS / "tokenizer"
    dest.mkdir(parents=True, exist_ok=True)
    out.save(str(dest / "tokenizer.json"))
    (dest / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
        "clean_up_tokenization_spaces": False, "model_max_length": 8192,
    }, indent=2) + "\n")
    print(f"wrote {dest}: vocab {out.get_vocab_size(with_added_tokens=True)}, {len(merges)} merges")


if __name__ == "__main__":
    main()
