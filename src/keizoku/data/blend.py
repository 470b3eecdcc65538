"""Training and validation samples from keizoku datasets, built by megatron-core.

Samples come from megatron-core's ``GPTDataset`` and ``BlendedMegatronDatasetBuilder`` — documents joined with
EOD, ``seq_length + 1`` tokens per sample, a seeded shuffle, indices cached on disk — so a run draws the same
samples in the same order as Megatron training with the same blend and seed, and the Megatron-Bridge engine
can reuse them. What keizoku adds:

- paths may be a dataset prefix or a directory written by ``keizoku tokenize`` (its manifest lists the
  datasets; a directory counts as one source, its datasets weighted by their token counts);
- token budgets (``{path, tokens}``): each source contributes exactly that many tokens over the run
  (repeating or truncating it), which requires the budgets to add up to the run's length;
- ``SampleSampler``: the sample order for a data-parallel rank from any consumed-sample count, so a resumed
  run continues at the exact next sample.

megatron-core's builder needs ``torch.distributed`` to be initialised (a one-process gloo group on a laptop).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from keizoku.config import DataConfig, DatasetEntry, KeizokuConfig
from keizoku.data import manifest as mf
from keizoku.data.indexed import dataset_paths, read_index_header
from keizoku.errors import KeizokuError
from keizoku.rundir import RunDir


class DataError(KeizokuError, ValueError):
    """A data setting that cannot be satisfied; the message names the config key."""


@dataclass
class Source:
    """One entry of a blend, resolved to dataset prefixes with their token counts."""

    key: str  # config key path, for messages
    prefixes: list[str]
    tokens: list[int]
    weight: float | None
    budget: int | None


class MegatronTokenizerShim:
    """What GPTDataset reads from a tokenizer: the EOD id, vocabulary size and an identity for the cache."""

    def __init__(self, eod: int, vocab_size: int, fingerprint: str):
        self.eod = eod
        self.vocab_size = vocab_size
        self.unique_identifiers = OrderedDict(
            [("class", "keizoku"), ("fingerprint", fingerprint), ("eod", eod), ("vocab_size", vocab_size)])


def run_tokenizer(cfg: KeizokuConfig) -> MegatronTokenizerShim:
    """What GPTDataset needs of the run's tokenizer (``base_model.tokenizer_dir``: the run's copy, else
    ``model.tokenizer``, else ``model.hf_path``)."""
    from keizoku.base_model import tokenizer_dir
    from keizoku.data.tokenizer import load_tokenizer, tokenizer_fingerprint

    tok = load_tokenizer(tokenizer_dir(cfg))
    if tok.eos_id is None:
        raise DataError("model.tokenizer: the tokenizer has no eos token (the EOD that joins documents)")
    return MegatronTokenizerShim(tok.eos_id, tok.vocab_size, tokenizer_fingerprint(tok))


def sample_cache_dir(cfg: KeizokuConfig) -> Path:
    """Where megatron-core caches the run's sample indices: ``data.cache_dir``, else ``RUN_DIR/data-cache``."""
    return Path(cfg.data.cache_dir or RunDir(cfg.run_dir).data_cache).absolute()


def resolve(entries: list[DatasetEntry], key: str) -> list[Source]:
    """Expand each entry's path to dataset prefixes (a directory's manifest lists them)."""
    return [resolve_entry(entry, f"{key}[{i}].path") for i, entry in enumerate(entries)]


def resolve_entry(entry: DatasetEntry, where: str) -> Source:
    """One entry (``where``: its config key) → its dataset prefixes and their token counts, or a DataError."""
    path = Path(entry.path)
    if path.is_dir():
        found = mf.find(path)
        if found is None:
            raise DataError(f"{where}: {path} is a directory without a {mf.MANIFEST_NAME}; give dataset prefixes "
                            "or a directory written by keizoku tokenize")
        manifest_path, data = found
        names = sorted(data["datasets"])
        keys = {data["datasets"][n]["key"] for n in names}
        if len(keys) > 1:
            raise DataError(f"{where}: {path} holds datasets of several keys ({', '.join(sorted(keys))}); "
                            "list the prefixes you want")
        prefixes = [str(manifest_path.parent / n) for n in names]
        if not prefixes:
            raise DataError(f"{where}: {manifest_path} lists no datasets")
    else:
        prefixes = [str(path)]
    tokens = []
    for p in prefixes:
        bin_path, idx_path = dataset_paths(p)
        if not idx_path.exists() or not bin_path.exists():
            missing = " and ".join(str(f) for f in (bin_path, idx_path) if not f.exists())
            raise DataError(f"{where}: no dataset {p} ({missing} not found; a dataset is PREFIX.bin and PREFIX.idx, "
                            "or a directory written by keizoku tokenize)")
        tokens.append(bin_path.stat().st_size // read_index_header(idx_path)["dtype"].itemsize)
    if sum(tokens) == 0:
        raise DataError(f"{where}: {entry.path} holds no tokens")
    return Source(where.rsplit(".", 1)[0], prefixes, tokens, entry.weight, entry.tokens)


def blend_of(sources: list[Source], total_tokens: int | None,
             key: str = "data.blend") -> tuple[list[str], list[float] | None]:
    """Megatron's (prefixes, weights): a source's weight is shared among its datasets by their tokens."""
    if all(s.weight is None and s.budget is None for s in sources):
        if len(sources) == 1 and len(sources[0].prefixes) == 1:
            return sources[0].prefixes, None
        shares = [float(sum(s.tokens)) for s in sources]  # unweighted: as if concatenated
    elif sources[0].budget is not None:
        budget = sum(s.budget for s in sources)
        if total_tokens is not None and abs(budget - total_tokens) > 0.01 * total_tokens:
            raise DataError(f"{key}: token budgets add up to {budget:,} tokens but the run trains on "
                            f"{total_tokens:,} (train.max_tokens, or max_steps × global batch × seq_length)"
                            if key == "data.blend" else
                            f"{key}: token budgets add up to {budget:,} tokens but the phase trains on "
                            f"{total_tokens:,} (its max_tokens, or max_steps × global batch × seq_length)")
        shares = [float(s.budget) for s in sources]
    else:
        shares = [s.weight for s in sources]
    prefixes, weights = [], []
    for share, s in zip(shares, sources):
        for p, n in zip(s.prefixes, s.tokens):
            prefixes.append(p)
            weights.append(share * n / sum(s.tokens))
    return prefixes, weights


def build(data: DataConfig, *, seq_length: int, train_samples: int, eval_samples: int,
          tokenizer: MegatronTokenizerShim, cache_dir: str | Path, key: str = "data.blend", seed: int | None = None,
          budget_tokens: int | None = None):
    """(train dataset, {validation name: dataset}) built by megatron-core. ``key``: where ``data.blend`` came from,
    for messages (a phase's: ``phases[1].blend``); ``seed``: the sample order's (default: data.seed);
    ``budget_tokens``: what token budgets must add up to (default: all ``train_samples``; a phase: its own)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset

    budget = train_samples * seq_length if budget_tokens is None else budget_tokens
    train_blend = blend_of(resolve(data.blend, key), budget, key)
    config = _gpt_config(data, seq_length, tokenizer, cache_dir, [train_blend, None, None], seed)
    train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [train_samples, None, None], lambda: True, config).build()
    return train, build_validation(data, seq_length=seq_length, eval_samples=eval_samples, tokenizer=tokenizer,
                                   cache_dir=cache_dir)


def segment_data(cfg: KeizokuConfig, segment) -> DataConfig:
    """``cfg.data`` with a segment's (``keizoku.schedule.Segment``) blend and validation sets."""
    from dataclasses import replace

    return replace(cfg.data, blend=list(segment.blend), validation=dict(segment.validation))


def build_validation(data: DataConfig, *, seq_length: int, eval_samples: int, tokenizer: MegatronTokenizerShim,
                     cache_dir: str | Path) -> dict:
    """{validation name: dataset} of ``data.validation``, ``eval_samples`` samples each (both engines use this, so
    they evaluate the same samples)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset

    validation = {}
    for name, entries in data.validation.items():
        blend = blend_of(resolve(entries, f"data.validation.{name}"), None)
        config = _gpt_config(data, seq_length, tokenizer, cache_dir, [None, blend, None])
        _, validation[name], _ = BlendedMegatronDatasetBuilder(
            GPTDataset, [None, eval_samples, None], lambda: True, config).build()
    return validation


def _gpt_config(data: DataConfig, seq_length: int, tokenizer, cache_dir, blend_per_split, seed: int | None = None):
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    logging.getLogger("megatron.core.datasets").setLevel(logging.WARNING)
    return GPTDatasetConfig(
        random_seed=data.seed if seed is None else seed, sequence_length=seq_length, blend_per_split=blend_per_split,
        path_to_cache=str(cache_dir), tokenizer=tokenizer, reset_position_ids=False,
        reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=False,
    )


class SampleSampler:
    """Micro batches of sample indices for one data-parallel rank, from ``consumed`` samples on.

    Global batch g = micro batch × data-parallel size × accumulation steps; step after step, samples
    ``[consumed, consumed + g)`` are split rank-major into micro batches, so a run resumed at ``consumed``
    continues exactly where it stopped, whatever the number of ranks before and after.
    """

    def __init__(self, total: int, consumed: int, micro_batch: int, rank: int, world: int):
        self.total, self.consumed = total, consumed
        self.micro, self.rank, self.world = micro_batch, rank, world

    def __iter__(self):
        step = self.micro * self.world
        start = self.consumed
        while start + step <= self.total:
            first = start + self.rank * self.micro
            yield list(range(first, first + self.micro))
            start += step

    def __len__(self) -> int:
        return max(0, (self.total - self.consumed) // (self.micro * self.world))

