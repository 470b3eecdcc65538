"""The MMIDIDX writer against megatron-core's own builder and reader."""

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

from keizoku.data.indexed import IndexedDatasetReader, IndexedDatasetWriter, optimal_dtype, read_index_header


@pytest.mark.parametrize("vocab", [8002, 128256])
def test_writer_is_byte_identical_to_megatron_builder(tmp_path, vocab):
    rng = np.random.default_rng(vocab)
    dtype = optimal_dtype(vocab)
    assert dtype == (np.uint16 if vocab < 65500 else np.int32)
    docs = [rng.integers(0, vocab, size=n).tolist() for n in rng.integers(0, 300, size=500)]
    docs[0] = []  # empty documents: no sequence, repeated document index
    docs[17] = []
    builder = IndexedDatasetBuilder(str(tmp_path / "mega.bin"), dtype=dtype.type)
    for d in docs:
        builder.add_document(d, [len(d)] if d else [])
    builder.finalize(str(tmp_path / "mega.idx"))

    writer = IndexedDatasetWriter(tmp_path / "ours", dtype)
    for lo in range(0, len(docs), 37):  # several chunks of unequal size
        part = docs[lo:lo + 37]
        writer.add_chunk(np.array([t for d in part for t in d], dtype=np.int64), [len(d) for d in part])
    writer.finalize()
    assert (tmp_path / "ours.bin").read_bytes() == (tmp_path / "mega.bin").read_bytes()
    assert (tmp_path / "ours.idx").read_bytes() == (tmp_path / "mega.idx").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mega.bin", "mega.idx", "ours.bin", "ours.idx"]

    ds = IndexedDataset(str(tmp_path / "ours"))
    non_empty = [d for d in docs if d]
    assert len(ds) == len(non_empty)
    for i in (0, 1, len(non_empty) - 1):
        assert ds[i].tolist() == non_empty[i]
    assert len(ds.document_indices) == len(docs) + 1
    ours = IndexedDatasetReader(tmp_path / "ours")
    assert [ours.document(i).tolist() for i in range(len(docs))] == docs
    assert read_index_header(tmp_path / "ours.idx")["documents"] == len(docs)


def test_staged_until_finalized(tmp_path):
    """Nothing under the final names before finalize; after it, nothing else."""
    w = IndexedDatasetWriter(tmp_path / "x", np.uint16)
    w.add_chunk(np.arange(5), [2, 3])
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp.x.bin", ".tmp.x.lengths"]
    w.finalize()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.bin", "x.idx"]
    assert IndexedDatasetReader(tmp_path / "x").document(1).tolist() == [2, 3, 4]


def test_abort_leaves_nothing(tmp_path):
    w = IndexedDatasetWriter(tmp_path / "x", np.int32)
    w.add_chunk(np.arange(5), [2, 3])
    w.abort()
    assert list(tmp_path.iterdir()) == []


def test_lengths_must_add_up(tmp_path):
    w = IndexedDatasetWriter(tmp_path / "x", np.int32)
    with pytest.raises(ValueError):
        w.add_chunk(np.arange(5), [2, 2])
    w.abort()
