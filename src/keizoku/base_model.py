"""The run's own copy of its base model's small files (``RUN_DIR/base-model/``), for every engine.

At a run's first start ``snapshot`` copies, byte for byte:

- from ``model.hf_path`` (a local directory, or a hub id: its cached or downloaded files): ``config.json`` and
  ``generation_config.json``, and with ``model.trust_remote_code`` the model's ``*.py`` files;
- from ``model.tokenizer or model.hf_path``, into ``tokenizer/``: the tokenizer's files that transformers reads
  (``TOKENIZER_FILES``, the files its tokenizer class names, and config.json, from which AutoTokenizer may take the
  class), then checks that the copy loads as the same tokenizer;

never weights, and records ``keizoku-base-model.json`` (``RECORD``)::

    {"model": "model.hf_path as given", "model_from": "the directory read", "tokenizer": "…", "tokenizer_from": "…",
     "copied": "UTC time", "config_sha256": "sha256 of config.json", "files": ["config.json", "tokenizer/…", …]}

Later starts leave it as it is (and refuse a ``model.hf_path`` whose config.json is no longer the one copied).
Steps read the model's config and the tokenizer where ``model_dir`` and ``tokenizer_dir`` say: the snapshot once
it exists, so that a run is exported, and resumed from its checkpoints, after ``model.hf_path`` is moved or deleted
(only a first start reads the weights there); ``model.hf_path`` before (runs of older keizoku releases too).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

from keizoku.config import KeizokuConfig
from keizoku.errors import KeizokuError
from keizoku.rundir import RunDir, discard, publish, staging_path

RECORD = "keizoku-base-model.json"
TOKENIZER_DIR = "tokenizer"  # apart: AutoTokenizer may read a config.json, which must be the tokenizer's own
CONFIG_FILES = ("config.json", "generation_config.json")
# what AutoTokenizer reads besides the files its class names (vocab_files_names): configs, added tokens, chat templates
TOKENIZER_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja",
                   "chat_template.json", "additional_chat_templates")
# what a hub download fetches: the small files above (never weights)
HUB_PATTERNS = ["*.json", "*.jinja", "*.model", "*.txt", "*.tiktoken", "*.py", "additional_chat_templates/*"]


class BaseModelError(KeizokuError, ValueError):
    """The base model's files cannot be read or copied; the message names the config key."""


def snapshot(cfg: KeizokuConfig) -> Path:
    """``RUN_DIR/base-model``, made now if the run has none (see the module docstring); rank 0 only."""
    final = RunDir(cfg.run_dir).base_model
    if final.is_dir():
        _check_same_model(cfg, final)
        return final
    model_src = local_dir(cfg.model.hf_path, "model.hf_path")
    tokenizer_key = "model.tokenizer" if cfg.model.tokenizer else "model.hf_path"
    tokenizer_src = local_dir(cfg.model.tokenizer or cfg.model.hf_path, tokenizer_key)
    staged = staging_path(final, tag="")  # one name: what a killed start left is replaced
    discard(staged)
    staged.mkdir(parents=True)
    try:
        files = _copy_model_files(model_src, staged, cfg.model.trust_remote_code)
        (staged / TOKENIZER_DIR).mkdir()
        files += [f"{TOKENIZER_DIR}/{name}" for name in _copy_tokenizer(tokenizer_src, staged / TOKENIZER_DIR,
                                                                          tokenizer_key, cfg.model.trust_remote_code)]
        record = {"model": cfg.model.hf_path, "model_from": str(model_src), "tokenizer": cfg.model.tokenizer
                  or cfg.model.hf_path, "tokenizer_from": str(tokenizer_src),
                  "copied": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "config_sha256": _sha256(staged / "config.json"), "files": sorted(set(files))}
        (staged / RECORD).write_text(json.dumps(record, indent=1) + "\n")
        return publish(staged, final)
    except BaseException:
        discard(staged)
        raise


def model_dir(cfg: KeizokuConfig) -> str:
    """Where to read the model's config (config.json, generation config, remote code): the run's snapshot once it
    exists, else ``model.hf_path``."""
    found = RunDir(cfg.run_dir).base_model
    return str(found) if found.is_dir() else cfg.model.hf_path


def tokenizer_dir(cfg: KeizokuConfig) -> str:
    """Where to read the tokenizer: the run's snapshot once it exists, else ``model.tokenizer or model.hf_path``."""
    found = RunDir(cfg.run_dir).base_model / TOKENIZER_DIR
    return str(found) if found.is_dir() else cfg.model.tokenizer or cfg.model.hf_path


def local_dir(name_or_path: str, key: str) -> Path:
    """The local directory of a model or tokenizer: the path itself, or a hub id's snapshot in the HF cache
    (small files only; downloaded unless HF_HUB_OFFLINE is set)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path.absolute()
    if path.is_absolute() or name_or_path.startswith((".", "~")) or name_or_path.count("/") > 1:
        raise BaseModelError(f"{key}: {name_or_path}: no such directory")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name_or_path, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # noqa: BLE001 - the hub raises many kinds (offline, not found, invalid id); all mean this
        raise BaseModelError(f"{key}: {name_or_path!r} is neither a local directory nor a hub model that can be "
                             f"read here ({type(e).__name__}: {_one_line(e)})") from None


def _copy_model_files(src: Path, dest: Path, trust_remote_code: bool) -> list[str]:
    if not (src / "config.json").is_file():
        raise BaseModelError(f"model.hf_path: {src} has no config.json; it is not a Hugging Face model directory")
    names = [n for n in CONFIG_FILES if (src / n).is_file()]
    if trust_remote_code:  # the model's own code, which config.json's auto_map names
        names += [p.name for p in src.glob("*.py")]
    for name in names:
        shutil.copyfile(src / name, dest / name)
    return names


def _copy_tokenizer(src: Path, dest: Path, key: str, trust_remote_code: bool) -> list[str]:
    """Copy the tokenizer's files from ``src``; the copy must load as the same tokenizer (same vocabulary and
    special tokens), or a file transformers needs was missed."""
    from transformers import AutoTokenizer

    try:
        original = AutoTokenizer.from_pretrained(str(src), trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds; all mean "cannot load"
        raise BaseModelError(f"{key}: cannot load the tokenizer in {src}: {_one_line(e)}") from None
    wanted = set(TOKENIZER_FILES) | set(getattr(original, "vocab_files_names", {}).values())
    names = [p.name for p in src.iterdir() if p.name in wanted or p.suffix == ".tiktoken"
             or trust_remote_code and p.suffix == ".py"]
    for name in names:
        if (src / name).is_dir():
            shutil.copytree(src / name, dest / name, dirs_exist_ok=True)
        else:
            shutil.copyfile(src / name, dest / name)
    copy = AutoTokenizer.from_pretrained(str(dest), trust_remote_code=trust_remote_code)
    if copy.get_vocab() != original.get_vocab() or copy.all_special_ids != original.all_special_ids:
        raise BaseModelError(f"{key}: the copy of the tokenizer in {src} does not load as the original (a file it "
                             f"needs is not among those keizoku copies: {', '.join(sorted(names))})")
    return names


def _check_same_model(cfg: KeizokuConfig, snapshot_dir: Path) -> None:
    """A later start: model.hf_path, where it is still a local directory, must be the model the run began with."""
    source = Path(cfg.model.hf_path).expanduser() / "config.json"
    try:
        record = json.loads((snapshot_dir / RECORD).read_text())
    except (OSError, ValueError):
        return  # not a snapshot of this keizoku release: leave it
    if source.is_file() and _sha256(source) != record.get("config_sha256"):
        raise BaseModelError(
            f"model.hf_path: {cfg.model.hf_path}'s config.json is not the one the run copied at its first start "
            f"(from {record.get('model')}, into {snapshot_dir}); a run continues one base model: use a new run_dir, "
            f"or delete {snapshot_dir} to take this model's")


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
