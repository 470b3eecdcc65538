"""What a training config asks that its inputs cannot give, found before anything is written or loaded.

``problems(cfg)`` reads only small files — the base model's config.json and tokenizer (the run's copy once it has
one, ``base_model``), each dataset's ``.idx`` header and its directory's ``keizoku-manifest.json`` — and returns one
line per problem, each naming the config key at fault and what to do:

- ``model.hf_path`` / ``model.tokenizer``: a local directory that is not there, or not a Hugging Face model (no
  config.json, no weights where a first start needs them); a hub id that cannot be read here;
- ``data.seq_length`` above the model's ``max_position_embeddings``; (engine torch) a ``model.attn_implementation``
  the model cannot use;
- every path of ``data.blend`` and ``data.validation`` (and of each phase's and extension's): a missing directory,
  manifest or ``.bin``/``.idx`` pair;
- every dataset whose manifest says it was tokenized with a vocabulary larger than the model's embedding (its ids
  would index past it, a minute into training), or with another tokenizer than the run's (same ids, other tokens;
  ``data.require_run_tokenizer: false`` accepts any tokenizer whose ids fit);
- ``eval.downstream`` (when on): lm-eval not installed, an ``include_path`` that is not there, a ``profile`` that does
  not load (``keizoku.downstream.problems``).

``keizoku train`` (both engines) stops on them before it makes the run directory (exit 2, ``ExitCode.CONFIG``);
``keizoku config check`` prints them. Datasets without a manifest (made by Megatron-LM's tools) are checked as
they are read: the torch engine refuses a batch holding an id past the embedding (``check_token_ids``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from keizoku.config import KeizokuConfig
from keizoku.errors import KeizokuError
from keizoku.rundir import RunDir, latest_checkpoint

WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "model*.bin", "*.pt")


class TokenIdError(KeizokuError, ValueError):
    """A sample holds a token id past the model's embedding."""


@dataclass(frozen=True)
class RunTokenizer:
    path: str
    ids_fingerprint: str
    fingerprint: str  # as manifests before ids_fingerprint recorded it (depends on how the tokenizer was loaded)

    def made(self, recorded: dict) -> bool:
        """Whether a manifest's tokenizer record is this tokenizer (a record without fingerprints: unknown, yes)."""
        if recorded.get("ids_fingerprint"):
            return recorded["ids_fingerprint"] == self.ids_fingerprint
        return recorded.get("fingerprint") in (None, self.fingerprint)


def problems(cfg: KeizokuConfig) -> list[str]:
    """Every problem found (see the module docstring); empty when the inputs can give what the config asks."""
    from keizoku import base_model, downstream

    found = _model_files(cfg)
    model_ok = not found  # else the datasets' paths are still checked, not what they need of the model
    model_config = _model_config(cfg) if model_ok else {}
    if model_ok:
        found += _positions(cfg, model_config) + _router(cfg, model_config) + _attention(cfg)
    run_tokenizer = None
    entries = [(f"data.blend[{i}].path", e) for i, e in enumerate(cfg.data.blend)]
    entries += [(f"data.validation.{name}[{i}].path", e) for name, es in cfg.data.validation.items()
                for i, e in enumerate(es)]
    for section, phases in (("phases", cfg.phases), ("extensions", cfg.extensions)):
        for j, ph in enumerate(phases):
            entries += [(f"{section}[{j}].blend[{i}].path", e) for i, e in enumerate(ph.blend)]
            entries += [(f"{section}[{j}].validation.{name}[{i}].path", e)
                        for name, es in (ph.validation or {}).items() for i, e in enumerate(es)]
    if model_ok and entries:
        try:
            from keizoku.data.tokenizer import ids_fingerprint, load_tokenizer, tokenizer_fingerprint

            tok = load_tokenizer(base_model.tokenizer_dir(cfg))
            run_tokenizer = RunTokenizer(base_model.tokenizer_dir(cfg), ids_fingerprint(tok),
                                         tokenizer_fingerprint(tok))
        except (OSError, ValueError) as e:
            key = "model.tokenizer" if cfg.model.tokenizer else "model.hf_path"
            found.append(f"{key}: cannot load the tokenizer: {' '.join(str(e).split())}")
    for key, entry in entries:
        found += _dataset(cfg, key, entry, model_config, run_tokenizer)
    return found + downstream.problems(cfg)


def vocab_size(model_config: dict) -> int | None:
    """The number of rows of the model's input embedding, as its config.json says."""
    text = model_config.get("text_config", model_config)  # multimodal configs keep the LM's apart
    value = text.get("vocab_size", text.get("padded_vocab_size"))
    return value if isinstance(value, int) else None


def check_token_ids(tokens, vocab: int, where: str) -> None:
    """A batch (CPU tensor of ids) must hold ids below ``vocab``; else a one-line error instead of an index error
    (on a GPU a device-side assert) deep in the embedding."""
    top = int(tokens.max())
    if top >= vocab:
        raise TokenIdError(f"{where}: holds token id {top}, past the model's embedding ({vocab} rows): the data was "
                           "tokenized with another tokenizer than the model's; tokenize it with model.tokenizer (or "
                           "model.hf_path's tokenizer)")


# --- the model ------------------------------------------------------------------------------------------------

def _model_files(cfg: KeizokuConfig) -> list[str]:
    """The sources this start reads can be read: on a first start the config and tokenizer (later starts read the
    run's copy), and the weights where this start begins from them."""
    from keizoku import base_model

    run = RunDir(cfg.run_dir)
    first_start, weights = not run.base_model.is_dir(), _needs_pretrained_weights(cfg, run)
    found = []
    for key, value in (("model.hf_path", cfg.model.hf_path), ("model.tokenizer", cfg.model.tokenizer)):
        if not value or not (first_start or key == "model.hf_path" and weights):
            continue
        try:
            path = base_model.local_dir(value, key)
        except base_model.BaseModelError as e:
            found.append(str(e))
            continue
        if key != "model.hf_path":
            continue
        if not (path / "config.json").is_file():
            found.append(f"model.hf_path: {value} has no config.json; it is not a Hugging Face model directory")
        elif weights and Path(value).expanduser().is_dir() and not any(next(path.glob(p), None)
                                                                        for p in WEIGHT_PATTERNS):
            found.append(f"model.hf_path: {value} holds no weights (*.safetensors, pytorch_model*.bin), which this "
                         "start reads; point it at the model's directory (or set model.init: random)")
    return found


def _needs_pretrained_weights(cfg: KeizokuConfig, run: RunDir) -> bool:
    """Whether this start reads the base model's weights: a first start from a pretrained model."""
    if cfg.model.init != "pretrained" or cfg.checkpoint.resume not in ("auto", "none"):
        return False
    return cfg.checkpoint.resume == "none" or latest_checkpoint(run.path, engine=cfg.engine) is None


def _model_config(cfg: KeizokuConfig) -> dict:
    from keizoku import base_model

    try:
        return json.loads((Path(base_model.model_dir(cfg)) / "config.json").read_text())
    except (OSError, ValueError):
        return {}  # a hub id without a local snapshot: nothing to check against


def _positions(cfg: KeizokuConfig, model_config: dict) -> list[str]:
    text = model_config.get("text_config", model_config)
    limit = text.get("max_position_embeddings", text.get("n_positions"))
    if isinstance(limit, int) and cfg.data.seq_length > limit:
        return [f"data.seq_length: {cfg.data.seq_length} is above the model's max_position_embeddings ({limit}, in its "
                f"config.json); positions past it were never trained. Lower data.seq_length to at most {limit}, or "
                "extend the model's context first (e.g. rope scaling in its config.json)."]
    return []


def _router(cfg: KeizokuConfig, model_config: dict) -> list[str]:
    """model.router_aux_loss_coef on a model without a router load-balancing loss (its config.json has no
    router_aux_loss_coef): there is nothing to weigh."""
    text = model_config.get("text_config", model_config)
    if cfg.model.router_aux_loss_coef is not None and model_config and "router_aux_loss_coef" not in text:
        return [f"model.router_aux_loss_coef: {cfg.model.router_aux_loss_coef} is set, but this model has no router "
                "load-balancing loss (its config.json has no router_aux_loss_coef: not a mixture of experts). "
                "Remove the setting."]
    return []


def _attention(cfg: KeizokuConfig) -> list[str]:
    """Engine torch: an ``attn_implementation`` other than auto that the model cannot use (built on the meta device,
    where transformers checks it, which costs no memory)."""
    if cfg.engine != "torch" or cfg.model.attn_implementation == "auto":
        return []
    from keizoku import base_model
    from keizoku.engines.torch.model import model_skeleton

    try:
        model_skeleton(cfg.model, base_model.model_dir(cfg))
    except KeizokuError as e:
        return [str(e)]
    return []


# --- the data -------------------------------------------------------------------------------------------------

def _dataset(cfg: KeizokuConfig, key: str, entry, model_config: dict,
             run_tokenizer: RunTokenizer | None) -> list[str]:
    """One blend entry: its datasets exist, and their manifests' tokenizer fits the model."""
    from keizoku.data import manifest as mf
    from keizoku.data.blend import DataError, resolve_entry

    try:
        source = resolve_entry(entry, key)
    except DataError as e:
        return [str(e)]
    except OSError as e:
        return [f"{key}: {entry.path}: cannot be read ({e.strerror or e})"]
    rows = vocab_size(model_config)
    found = []
    for prefix in source.prefixes:
        located = mf.find(Path(prefix))
        if located is None:
            continue  # made by another tool: its ids are checked as batches are read
        manifest_path, data = located
        entry_name = mf.entry_name(manifest_path, prefix)
        tokenizer = data["datasets"].get(entry_name, {}).get("tokenizer", {})
        try:
            name = mf.tokenizer_path(manifest_path, entry_name, data["datasets"].get(entry_name, {}))
        except mf.ManifestError:
            name = tokenizer.get("name_or_path", "?")
        data_vocab = tokenizer.get("vocab_size")
        if rows is not None and isinstance(data_vocab, int) and data_vocab > rows:
            found.append(f"{key}: {prefix} was tokenized with {name} ({data_vocab:,} tokens, {manifest_path}), more "
                         f"than the model's embedding has rows ({rows:,}): its ids would index past it. Tokenize the "
                         "data with the model's tokenizer (model.tokenizer, else model.hf_path's)")
            continue
        if cfg.data.require_run_tokenizer and run_tokenizer is not None and not run_tokenizer.made(tokenizer):
            found.append(f"{key}: {prefix} was tokenized with {name} ({manifest_path}), not with the run's tokenizer "
                         f"({run_tokenizer.path}): the same ids mean other tokens. Tokenize it with the run's "
                         "tokenizer, or set data.require_run_tokenizer=false if the two give the same ids")
    return found
