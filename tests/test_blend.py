"""Training/validation samples via megatron-core's GPTDataset from keizoku datasets."""

from __future__ import annotations

import collections
import os

import pytest
import torch.distributed as dist

from conftest import EN_SAMPLE, JA_SAMPLE, keizoku, write_jsonl
from keizoku.config import DataConfig, DatasetEntry
from keizoku.data.blend import DataError, MegatronTokenizerShim, SampleSampler, build, resolve

SEQ = 64


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory, tokenizer_dirs):
    out = tmp_path_factory.mktemp("tok")
    keizoku("tokenize", JA_SAMPLE, EN_SAMPLE, "-t", tokenizer_dirs["sample"], "-o", out / "both", "-q")
    keizoku("tokenize", JA_SAMPLE, "-t", tokenizer_dirs["sample"], "-o", out / "ja", "-q")
    write_jsonl(out / "tiny.jsonl", [{"text": "短い文書です。"}, {"text": "another short one"}, {"text": "三つ目"}])
    keizoku("tokenize", out / "tiny.jsonl", "-t", tokenizer_dirs["sample"], "-o", out / "tiny", "-q")
    return out


@pytest.fixture(scope="module", autouse=True)
def process_group(tmp_path_factory):
    # megatron-core's builder needs torch.distributed; a one-process gloo group, as on a laptop
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"file://{tmp_path_factory.mktemp('pg')}/store", rank=0,
                                world_size=1)
    yield
    dist.destroy_process_group()


def _build(data, cache, train_samples=400, eval_samples=16):
    return build(data, seq_length=SEQ, train_samples=train_samples, eval_samples=eval_samples,
                 tokenizer=MegatronTokenizerShim(8001, 8002, "test"), cache_dir=cache)


def test_weighted_blend_is_megatron_gpt_dataset(tokenized, tmp_path):
    ja, en = str(tokenized / "both/ja_sample_text_document"), str(tokenized / "both/en_sample_text_document")
    data = DataConfig(blend=[DatasetEntry(ja, weight=0.9), DatasetEntry(en, weight=0.1)],
                      validation={"ja": [DatasetEntry(ja)], "en": [DatasetEntry(en)]})
    train, valid = _build(data, tmp_path / "cache")
    assert type(train).__name__ == "BlendedDataset" and len(train) == 400
    counts = collections.Counter(train.dataset_index.tolist())
    assert abs(counts[0] / 400 - 0.9) < 0.02 and abs(counts[1] / 400 - 0.1) < 0.02
    sample = train[0]
    assert sample["tokens"].shape == (SEQ,) and sample["labels"].shape == (SEQ,)
    assert (sample["tokens"][1:] == sample["labels"][:-1]).all()  # seq_length + 1 tokens per sample
    assert sorted(valid) == ["en", "ja"] and len(valid["ja"]) >= 16
    # the same seed gives the same samples, from a fresh cache too; another seed does not
    again, _ = _build(data, tmp_path / "cache2")
    assert all((train[i]["tokens"] == again[i]["tokens"]).all() for i in range(0, 400, 37))
    data.seed += 1
    other, _ = _build(data, tmp_path / "cache3")
    assert any((train[i]["tokens"] != other[i]["tokens"]).any() for i in range(10))


def test_directory_and_budgets(tokenized, tmp_path):
    sources = resolve([DatasetEntry(str(tokenized / "both"))], "data.blend")
    assert [os.path.basename(p) for p in sources[0].prefixes] == ["en_sample_text_document", "ja_sample_text_document"]
    ja_tokens = sources[0].tokens[1]
    tiny = resolve([DatasetEntry(str(tokenized / "tiny"))], "data.blend")[0]
    assert sum(tiny.tokens) < 100 * SEQ < ja_tokens  # one budget repeats its dataset, the other truncates
    data = DataConfig(blend=[DatasetEntry(str(tokenized / "ja"), tokens=300 * SEQ),
                             DatasetEntry(str(tokenized / "tiny"), tokens=100 * SEQ)])
    train, _ = _build(data, tmp_path / "cache")
    counts = collections.Counter(train.dataset_index.tolist())
    assert counts == {0: 300, 1: 100}  # exactly the budgets
    tiny_samples = {tuple(train[i]["tokens"][:8].tolist()) for i in range(400) if train.dataset_index[i] == 1}
    assert len(tiny_samples) < 100  # the tiny dataset's few samples come round again
    with pytest.raises(DataError, match=r"data.blend: token budgets add up to 25,600 tokens but the run trains on 12,800"):
        _build(data, tmp_path / "cache", train_samples=200)


def test_bad_paths_name_the_key(tokenized, tmp_path):
    with pytest.raises(DataError, match=r"data.blend\[0\].path: no dataset"):
        resolve([DatasetEntry(str(tmp_path / "missing"))], "data.blend")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"data.validation.ja\[0\].path: .* is a directory without"):
        resolve([DatasetEntry(str(tmp_path / "empty"))], "data.validation.ja")


def test_sampler_resumes_at_the_next_sample():
    full = [b for r in range(2) for b in SampleSampler(64, 0, 4, r, 2)]
    assert sorted(i for b in full for i in b) == list(range(64))
    resumed = list(SampleSampler(64, 24, 4, rank=1, world=2))
    assert resumed[0] == [28, 29, 30, 31] and list(SampleSampler(64, 0, 4, 1, 2))[3] == resumed[0]
    assert len(SampleSampler(64, 24, 4, 1, 2)) == 5
