"""engine: torch's ``keizoku export``: a training checkpoint → a Hugging Face model directory, streamed.

The model is never in memory whole, nor any of its tensors. Its architecture is built on the meta device from the
run's copy of the base model's config (``keizoku.base_model``; ``model.hf_path`` for runs without one), and says
what ``save_pretrained`` would write (``plan``): the tensors' names — a tied output layer left out, and under
transformers 5 the conversions it applies at load reverted (Mixtral's merged experts are written one tensor per
expert) — shapes and order, split into files as transformers splits them (``MAX_SHARD_BYTES``):
``model.safetensors``, or ``model-0000K-of-0000N.safetensors`` with ``model.safetensors.index.json``. Each file's
safetensors header is written first (``SafetensorsWriter``); then the data, by several threads (``WORKERS``):

- a tensor written as the checkpoint holds it (every tensor of a Llama, Qwen, Gemma…) is copied a slice at a time
  (``SLICE_BYTES``; ``checkpoint_reader``): read, converted to the output dtype, written at its place;
- tensors that save_pretrained converts (Mixtral's experts) are read a few decoder layers at a time
  (``READ_BATCH_BYTES``, torch.distributed.checkpoint's reader), converted as save_pretrained converts them, and
  written likewise.

Host memory: the slices in flight (``WORKERS`` × a few ``SLICE_BYTES``), or one batch of converted layers. Beside
the weights: config.json (naming the dtype written), generation_config.json, the tokenizer, and with
``model.trust_remote_code`` the model's code.

Output dtype: ``--dtype``; by default the base model's (config.json's ``dtype``/``torch_dtype``; fp32 if it names
none).

Verification, before the export is published (a failed one leaves nothing at ``out``):

- tensors, streamed (``verify``): each file's header is read back and must name exactly the planned tensors, dtypes
  and shapes (and safetensors must open the file); every slice written is read back from the file, at the place
  the header gives, and must equal the checkpoint's slice converted to the output dtype, bit for bit;
- logits (``verify_logits``; by default for models of at most ``LOGITS_CHECK_MAX_PARAMETERS``, since it holds one
  fp32 copy): transformers loads the export in fp32; its logits on probe sequences must equal (max |Δ| ≤
  ``MAX_LOGIT_DIFF``) those of the same model after its weights are overwritten with the checkpoint's, rounded to
  the output dtype — which checks that transformers reads every tensor where the checkpoint had it.

Faults, each an ExportError of one line naming the file and what to do, before anything is written where it can be
avoided: a damaged checkpoint (``.metadata``, a shard file or ``trainer_state.json`` missing, a shard shorter than
``.metadata`` says, an item that does not load: ``checkpoint_reader.CheckpointDamaged``) names the run's other
complete checkpoints to export with ``--step``; a run without its copy of the base model whose ``model.hf_path`` is
gone names the key and ``config.yaml``. The run directory is the one given, wherever it was moved or copied to.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from keizoku import base_model
from keizoku.config import load_config
from keizoku.engines import ExportError, checkpoint_to_export
from keizoku.engines.torch.checkpoint import TRAINER_STATE, read_trainer_state
from keizoku.engines.torch.checkpoint_reader import CheckpointDamaged, CheckpointReader, Slice, one_line, pread_into
from keizoku.hf import config_dtype, load_causal_lm, saved_form, set_config_dtype, tied_names
from keizoku.rundir import EXPORT_RECORD, RunDir, committed_checkpoints, discard, publish, staging_path

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MAX_SHARD_BYTES = 5 * 10**9  # as transformers 4.x's save_pretrained (5.x: 50 GB): hub models come in such shards
READ_BATCH_BYTES = 256 << 20  # converted tensors read at once (in the output dtype); a larger layer is read alone
SLICE_BYTES = 32 << 20  # of the checkpoint's bytes, read, converted and written by one thread at a time
WORKERS = min(8, os.cpu_count() or 1)  # threads copying slices: reads, conversions and writes overlap
LOGITS_CHECK_MAX_PARAMETERS = 1_500_000_000
MAX_LOGIT_DIFF = 1e-5
WEIGHTS_NAME, INDEX_NAME = "model.safetensors", "model.safetensors.index.json"
PROBE_SHAPE = (2, 32)


def export(run_dir: Path, out: Path, step: int | None = None, verify: bool = True, log=print, dtype: str = "auto",
           verify_logits: bool | None = None) -> dict:
    """Export a checkpoint of the run (``step``, default the newest) to ``out`` in ``dtype`` (auto, bf16, fp16,
    fp32); ``verify``: the tensors, and the logits when ``verify_logits`` (None: for small models). Returns what
    ``out/keizoku_export.json`` records."""
    run_dir, out = Path(run_dir), Path(out)
    # the run as it lies now: a run directory moved or copied reads its own base-model/, not config.yaml's run_dir's
    cfg = dataclasses.replace(load_config(RunDir(run_dir).config), run_dir=str(run_dir))
    saved = checkpoint_to_export(run_dir, step, "torch")
    try:
        return _export(cfg, run_dir, saved, out, verify, log, dtype, verify_logits)
    except CheckpointDamaged as e:
        raise ExportError(f"{e}: checkpoint step {saved.step} is damaged; {_what_else(run_dir, saved)}") from None


def _export(cfg, run_dir: Path, saved, out: Path, verify: bool, log, dtype: str, verify_logits: bool | None) -> dict:
    trainer_state = _trainer_state(saved.path)
    CheckpointReader(saved.path).check_files("model.")  # a damaged checkpoint fails here, before anything is built
    config_dir = _base_model_dir(cfg, run_dir)
    tokenizer = _load_tokenizer(cfg, run_dir)  # before the weights: a missing tokenizer fails at once
    plan = make_plan(cfg.model, config_dir, saved.path, output_dtype(config_dir, dtype))
    staged = staging_path(out)
    discard(staged)
    staged.mkdir(parents=True)
    try:
        start = time.perf_counter()
        verified = write_weights(plan, staged, verify)
        write_configs(plan, staged)
        tokenizer.save_pretrained(staged)
        log(f"wrote {len(plan.tensors)} tensors ({plan.total_bytes / 1e9:.2f} GB of {_name(plan.dtype)}) in "
            f"{len(plan.files)} file(s) in {time.perf_counter() - start:.1f} s")
        if verify:
            log(f"verified: every exported tensor equals the checkpoint's in {_name(plan.dtype)} ({verified} "
                "tensors, each slice read back as written)")
        info = {"run_dir": str(run_dir.absolute()), "checkpoint": saved.path.name, "step": trainer_state["step"],
                "consumed_tokens": trainer_state["consumed_tokens"], "base_model": cfg.model.hf_path,
                "dtype": _name(plan.dtype), "parameters": plan.parameters}
        if verify:
            info["verified_tensors"] = verified
            info.update(_verify_logits(plan, staged, verify_logits, log))
        (staged / EXPORT_RECORD).write_text(json.dumps(info, indent=1) + "\n")
        publish(staged, out, replace=True)
    except BaseException:
        discard(staged)
        raise
    log(f"exported {saved.path} (step {info['step']}) to {out}")
    return info


def _what_else(run_dir: Path, saved) -> str:
    """What to do about a damaged checkpoint: export another one of the run."""
    others = [c.step for c in committed_checkpoints(run_dir, "torch") if c.path != saved.path]
    if not others:
        return "the run has no other complete checkpoint to export"
    earlier = [n for n in others if n < saved.step]
    pick = earlier[-1] if earlier else others[-1]
    return (f"export {'an earlier' if earlier else 'another'} checkpoint with --step {pick} (the run's other "
            f"complete checkpoint{'s' if len(others) > 1 else ''}: step{'s' if len(others) > 1 else ''} "
            f"{', '.join(map(str, others))})")


def _trainer_state(checkpoint: Path) -> dict:
    """The checkpoint's trainer_state.json (its step and tokens), or CheckpointDamaged naming it."""
    path = checkpoint / TRAINER_STATE
    try:
        state = read_trainer_state(checkpoint)
        if not isinstance(state, dict):
            raise TypeError("not a JSON object")
        return {"step": int(state["step"]), "consumed_tokens": int(state["consumed_tokens"])}
    except FileNotFoundError:
        raise CheckpointDamaged(path, "missing") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointDamaged(path, f"unreadable ({type(e).__name__}: {one_line(e)})") from None


def _base_model_dir(cfg, run_dir: Path) -> str:
    """Where export reads the base model's config: the run's copy, or model.hf_path for a run without one — where
    it is a local path, it must still be there."""
    found, copy = base_model.model_dir(cfg), RunDir(run_dir).base_model
    if found == str(copy):
        if not (copy / "config.json").is_file():
            raise ExportError(f"{copy / 'config.json'}: missing from the run's copy of its base model; copy the base "
                              f"model's config.json there (model.hf_path: {cfg.model.hf_path})")
        return found
    if _local_path(found) and not (Path(found).expanduser() / "config.json").is_file():
        raise ExportError(
            f"{run_dir}: export needs the base model's config.json and tokenizer: the run has no copy of them "
            f"({RunDir(run_dir).base_model} is missing) and model.hf_path ({found}, in {RunDir(run_dir).config}) "
            f"has no config.json; put the base model back at {found}, or set model.hf_path in "
            f"{RunDir(run_dir).config} to where it is now")
    return found


def _load_tokenizer(cfg, run_dir: Path):
    """The tokenizer export writes beside the model: the run's copy, or model.tokenizer / model.hf_path."""
    from transformers import AutoTokenizer

    source = base_model.tokenizer_dir(cfg)
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.model.trust_remote_code)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds; all mean "cannot load"
        copy = RunDir(run_dir).base_model / base_model.TOKENIZER_DIR
        where = f"{copy}, the run's copy," if source == str(copy) else \
            f"{source} ({'model.tokenizer' if cfg.model.tokenizer else 'model.hf_path'} in {RunDir(run_dir).config}; " \
            f"the run has no copy in {copy})"
        raise ExportError(f"{where} does not load as a tokenizer ({type(e).__name__}: {one_line(e)[:300]}); export "
                          f"writes the tokenizer beside the model: copy the base model's tokenizer files into {copy}"
                          ) from None


def _local_path(name_or_path: str) -> bool:
    """Whether a model.hf_path names a local directory (else it may be a hub id), as keizoku.base_model reads it."""
    return Path(name_or_path).expanduser().exists() or Path(name_or_path).is_absolute() \
        or name_or_path.startswith((".", "~")) or name_or_path.count("/") > 1


def output_dtype(config_dir: str, asked: str) -> torch.dtype:
    """``asked`` (bf16, fp16, fp32), or for auto the dtype the base model's config.json names (fp32 if none)."""
    if asked != "auto":
        return DTYPES[asked]
    try:
        named = config_dtype(json.loads((Path(config_dir) / "config.json").read_text()))
    except (OSError, ValueError):
        named = None  # a hub id without a snapshot: transformers reads its config, which may name none
    found = getattr(torch, named, None) if isinstance(named, str) else None
    return found if isinstance(found, torch.dtype) and found.is_floating_point else torch.float32


# --- the plan ---------------------------------------------------------------------------------------------------

@dataclass
class ExportPlan:
    """What an export reads and writes, decided from the architecture and the checkpoint's metadata alone."""

    model: torch.nn.Module  # the architecture, on the meta device
    config_dir: str  # its config.json and generation_config.json (and code): a directory, or a hub id
    checkpoint: Path
    dtype: torch.dtype  # of the floating-point tensors written
    streamed: list[str]  # the checkpoint's tensors (state-dict names) written as they are, a slice at a time
    batches: list[list[str]]  # the checkpoint's tensors that save_pretrained converts, read together by layers
    tensors: dict[str, torch.Tensor]  # every tensor written: name → a meta tensor of its shape and dtype
    files: dict[str, list[str]]  # file name → the tensors it holds, as transformers splits them
    index: dict | None  # model.safetensors.index.json, when there are several files
    sources: dict[str, torch.Tensor] = field(repr=False)  # the state dict read from the checkpoint, on meta

    @property
    def total_bytes(self) -> int:
        return sum(_nbytes(t) for t in self.tensors.values())

    @property
    def parameters(self) -> int:
        return self.model.num_parameters()


def make_plan(model_cfg, config_dir: str, checkpoint: Path, dtype: torch.dtype) -> ExportPlan:
    """The export of ``checkpoint`` in ``dtype``, for the model of ``config_dir`` (``model_cfg``: model.*)."""
    from huggingface_hub import split_torch_state_dict_into_shards

    from keizoku.engines.torch.model import model_skeleton

    model = model_skeleton(model_cfg, config_dir)
    left_out = tied_names(model)
    sources = {k: _in_dtype(v, dtype) for k, v in model.state_dict().items() if k not in left_out}
    _check_checkpoint_holds(checkpoint, sources)
    tensors = saved_form(model, sources)
    split = split_torch_state_dict_into_shards(tensors, filename_pattern=WEIGHTS_NAME.replace(".", "{suffix}.", 1),
                                               max_shard_size=MAX_SHARD_BYTES)
    index = None
    if split.is_sharded:
        index = {"metadata": {"total_parameters": model.num_parameters(), **split.metadata},
                 "weight_map": split.tensor_to_filename}
    streamed, batches = _reading_order(model, sources, tensors)
    return ExportPlan(model, config_dir, checkpoint, dtype, streamed, batches, tensors, split.filename_to_tensors,
                      index, sources)


def _reading_order(model, sources: dict, tensors: dict) -> tuple[list[str], list[list[str]]]:
    """The checkpoint's tensors by decoder layer (a conversion at save combines tensors of one layer; other tensors
    alone), in the order they are written: those of the groups that save_pretrained writes as they are, streamed;
    the others in batches, consecutive groups joined up to READ_BATCH_BYTES."""
    groups: dict[str, list[str]] = {}
    for name in sources:
        groups.setdefault(_layer_of(name), []).append(name)
    order = {name: i for i, name in enumerate(tensors)}
    first_written, streamed, converted = {}, [], []
    for key, names in groups.items():
        written = saved_form(model, {n: sources[n] for n in names})
        if not written.keys() <= order.keys():
            raise ExportError(f"{type(model).__name__}: save_pretrained converts tensors of several decoder layers "
                              "together; keizoku cannot export it a layer at a time")
        first_written[key] = min(order[n] for n in written) if written else len(order)
        same = list(written) == names and all(written[n].shape == sources[n].shape for n in names)
        (streamed if same else converted).append(key)
    batches, size = [], READ_BATCH_BYTES
    for key in sorted(converted, key=first_written.get):
        group_bytes = sum(_nbytes(sources[n]) for n in groups[key])
        if size + group_bytes > READ_BATCH_BYTES:
            batches.append([])
            size = 0
        batches[-1] += groups[key]
        size += group_bytes
    return [n for key in sorted(streamed, key=first_written.get) for n in groups[key]], batches


def _layer_of(name: str) -> str:
    """The decoder layer a tensor belongs to (``model.layers.3``: its name up to the first number), or itself."""
    parts = name.split(".")
    number = next((i for i, p in enumerate(parts) if p.isdigit()), None)
    return name if number is None else ".".join(parts[:number + 1])


def _check_checkpoint_holds(checkpoint: Path, sources: dict) -> None:
    """The checkpoint has every tensor of the model, in its shape."""
    stored = CheckpointReader(checkpoint).tensors
    for name, t in sources.items():
        found = stored.get(f"model.{name}")
        if found is None or not hasattr(found, "size"):
            raise ExportError(f"{checkpoint}: holds no tensor model.{name}, which the base model has; it is not a "
                              "checkpoint of this run's model")
        if tuple(found.size) != tuple(t.shape):
            raise ExportError(f"{checkpoint}: model.{name} has shape {tuple(found.size)}, the base model's "
                              f"{tuple(t.shape)}")


# --- reading and writing ----------------------------------------------------------------------------------------

def read_batch(plan: ExportPlan, names: list[str]) -> dict[str, torch.Tensor]:
    """The written form of the checkpoint's tensors ``names``: read into tensors of the output dtype (DCP converts
    each as it copies it in), then as save_pretrained writes them."""
    state = {n: torch.empty(plan.sources[n].shape, dtype=plan.sources[n].dtype) for n in names}
    _load_into(state, plan.checkpoint)
    return saved_form(plan.model, state)


def _load_into(state: dict[str, torch.Tensor], checkpoint: Path) -> None:
    """Fill ``state``'s tensors, in place, with the checkpoint's ``model.<name>`` (converted to their dtypes)."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with warnings.catch_warnings():  # that one process reads it is the intent, not a mistake to warn of
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load({"model": state}, checkpoint_id=str(checkpoint), no_dist=True)
    except (CheckpointException, Exception) as e:  # noqa: BLE001 - CheckpointException is a BaseException
        failures = getattr(e, "failures", None) or {}
        cause = next((pair[0] for pair in failures.values()), e)  # DCP wraps each rank's own error
        if isinstance(cause, CheckpointDamaged):
            raise cause from None
        file = Path(getattr(cause, "filename", None) or checkpoint)
        raise CheckpointDamaged(file, f"torch.distributed.checkpoint cannot load it ({type(cause).__name__}: "
                                      f"{one_line(cause)[:300]})") from None


def write_weights(plan: ExportPlan, out: Path, verify: bool) -> int:
    """Write the weights' files (see the module docstring); with ``verify``, every slice is read back as the file's
    header places it and compared. Returns how many tensors were written."""
    writers = {filename: SafetensorsWriter(out / filename, {n: plan.tensors[n] for n in names})
               for filename, names in plan.files.items()}
    try:
        writer_of = {n: writers[filename] for filename, names in plan.files.items() for n in names}
        placed = {n: place for w in writers.values() for n, place in read_header(w.path, plan).items()} \
            if verify else {}
        with _Workers() as workers:
            reader = CheckpointReader(plan.checkpoint)
            for name in plan.streamed:
                for part in reader.slices(f"model.{name}", SLICE_BYTES):
                    workers.submit(_copy_slice, part, plan.dtype, writer_of[name], name, placed.get(name))
            for batch in plan.batches:
                for name, tensor in read_batch(plan, batch).items():
                    flat = tensor.reshape(-1)
                    workers.submit(_write_part, writer_of[name], name, 0, flat, placed.get(name))
        for writer in writers.values():
            writer.close()
        if verify:
            _check_files_open(plan, out)
    finally:
        for writer in writers.values():
            writer.abandon()
    if plan.index is not None:
        (out / INDEX_NAME).write_text(json.dumps(plan.index, indent=2, sort_keys=True) + "\n")
    return len(plan.tensors)


def _copy_slice(part: Slice, dtype: torch.dtype, writer: SafetensorsWriter, name: str, place: int | None) -> None:
    data = part.read()
    if data.is_floating_point():
        data = data.to(dtype)
    _write_part(writer, name, part.start, data, place)


def _write_part(writer: SafetensorsWriter, name: str, start: int, data: torch.Tensor, place: int | None) -> None:
    """Elements ``start…`` of tensor ``name``: written; read back from ``place`` (the file offset of the tensor's
    data, from the file's own header) and compared, bit for bit, when given."""
    offset = start * data.element_size()
    writer.write(name, offset, data)
    if place is not None:
        expected = data.view(torch.uint8)
        found = bytearray(expected.numel())
        with open(writer.path, "rb", buffering=0) as f:
            pread_into(f.fileno(), found, place + offset)
        if not torch.equal(torch.frombuffer(found, dtype=torch.uint8), expected):
            raise ExportError(f"{writer.path}: {name} differs from the checkpoint's {name} in "
                              f"{_name(data.dtype)} (read back at byte {offset} of it)")


class _Workers:
    """A few threads doing ``submit``'s tasks, at most ``2 × WORKERS`` queued (each may hold a slice); the first
    failure is raised, by ``submit`` or on leaving."""

    def __enter__(self):
        from concurrent.futures import ThreadPoolExecutor

        self.pool, self.pending = ThreadPoolExecutor(WORKERS, thread_name_prefix="keizoku-export"), []
        return self

    def submit(self, fn, *args) -> None:
        self.pending.append(self.pool.submit(fn, *args))
        while len(self.pending) > 2 * WORKERS:
            self.pending.pop(0).result()

    def __exit__(self, *error) -> None:
        try:
            if error[0] is None:
                for task in self.pending:
                    task.result()
        finally:
            for task in self.pending:
                task.cancel()
            self.pool.shutdown(wait=True)


# safetensors' dtypes in its own order: a file lays its tensors out by this order, last first, then by name
_SAFETENSORS_DTYPES = [(torch.bool, "BOOL"), (torch.uint8, "U8"), (torch.int8, "I8"), (torch.float8_e5m2, "F8_E5M2"),
                       (torch.float8_e4m3fn, "F8_E4M3"), (torch.int16, "I16"), (torch.uint16, "U16"),
                       (torch.float16, "F16"), (torch.bfloat16, "BF16"), (torch.int32, "I32"), (torch.uint32, "U32"),
                       (torch.float32, "F32"), (torch.float64, "F64"), (torch.int64, "I64"), (torch.uint64, "U64")]
_DTYPE_RANK = {dtype: (rank, name) for rank, (dtype, name) in enumerate(_SAFETENSORS_DTYPES)}


class SafetensorsWriter:
    """One safetensors file written a slice at a time, in any order, from any thread, its size known beforehand.

    The format: an 8-byte little-endian header length N; N bytes of JSON, ``{"__metadata__": {"format": "pt"},
    NAME: {"dtype": "BF16", "shape": [...], "data_offsets": [BEGIN, END]}, ...}`` padded with spaces to a multiple
    of 8; then the tensors' bytes (little-endian, row-major), BEGIN and END counted from there. The header is
    written first, tensors are laid out as safetensors' ``save_file`` lays them out (by dtype, larger first, then by
    name), so the file is the one ``save_file`` writes of the same tensors."""

    def __init__(self, path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None):
        header: dict = {"__metadata__": metadata or {"format": "pt"}}
        self.places: dict[str, tuple[int, int]] = {}
        offset = 0
        for name in sorted(tensors, key=lambda n: (-_DTYPE_RANK[tensors[n].dtype][0], n)):
            t, size = tensors[name], _nbytes(tensors[name])
            header[name] = {"dtype": _DTYPE_RANK[t.dtype][1], "shape": list(t.shape),
                            "data_offsets": [offset, offset + size]}
            self.places[name] = (offset, size)
            offset += size
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        text += b" " * (-len(text) % 8)
        self.path, self.data_start, self.lock = path, 8 + len(text), threading.Lock()
        self.unwritten = {name: size for name, (_, size) in self.places.items()}  # bytes
        self.fd: int | None = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        _pwrite_all(self.fd, struct.pack("<Q", len(text)) + text, 0)
        os.ftruncate(self.fd, self.data_start + offset)

    def write(self, name: str, offset: int, data: torch.Tensor) -> None:
        """Bytes ``offset…`` of tensor ``name``'s data (``data``: contiguous, its elements from there on); any
        thread."""
        begin, size = self.places[name]
        raw = data.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        if offset + raw.nbytes > size:
            raise ExportError(f"{self.path}: {name} has {size} bytes; {raw.nbytes} written at {offset} overflow it")
        _pwrite_all(self.fd, memoryview(raw), self.data_start + begin + offset)
        with self.lock:
            self.unwritten[name] -= raw.nbytes

    def close(self) -> None:
        """Flush to disk; every tensor must have been written."""
        missing = sorted(name for name, left in self.unwritten.items() if left)
        if missing:
            raise ExportError(f"{self.path}: {len(missing)} tensor(s) not written whole (e.g. {missing[0]})")
        os.fsync(self.fd)
        self.abandon()

    def abandon(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def read_header(path: Path, plan: ExportPlan) -> dict[str, int]:
    """The file offset of each tensor's data, from the file's own header, which must describe exactly the tensors
    the plan puts in it (dtype and shape)."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    names = plan.files[path.name]
    if set(header) != set(names):
        raise ExportError(f"{path}: its header lists {sorted(set(header) ^ set(names))[:3]} against the plan")
    for name in names:
        t = plan.tensors[name]
        if header[name]["dtype"] != _DTYPE_RANK[t.dtype][1] or header[name]["shape"] != list(t.shape):
            raise ExportError(f"{path}: its header describes {name} as {header[name]}, not {t.dtype} {list(t.shape)}")
    return {name: 8 + length + header[name]["data_offsets"][0] for name in names}


def _check_files_open(plan: ExportPlan, out: Path) -> None:
    """safetensors itself opens each file and finds the planned tensors; the index names the files written."""
    from safetensors import safe_open

    for filename, names in plan.files.items():
        with safe_open(out / filename, "pt") as f:
            if set(f.keys()) != set(names):
                raise ExportError(f"{out / filename}: holds {sorted(set(f.keys()) ^ set(names))[:3]} against the plan")


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def write_configs(plan: ExportPlan, out: Path) -> None:
    """config.json naming the dtype written and the model class, generation_config.json, and with remote code the
    model's ``*.py`` files — from the run's copy of the base model, as save_pretrained writes them."""
    import shutil

    from transformers import AutoConfig, GenerationConfig

    source = plan.config_dir
    config = AutoConfig.from_pretrained(source, trust_remote_code=_remote_code(plan))
    config.architectures = [type(plan.model).__name__]
    set_config_dtype(config, plan.dtype)
    config.save_pretrained(out)
    if plan.model.can_generate():
        try:
            generation = GenerationConfig.from_pretrained(source)
        except OSError:  # the base model has none: transformers derives one from config.json
            generation = plan.model.generation_config
        generation.save_pretrained(out)
    if _remote_code(plan):
        for code in Path(source).glob("*.py"):
            shutil.copyfile(code, out / code.name)


# --- verification -----------------------------------------------------------------------------------------------

def _verify_logits(plan: ExportPlan, out: Path, verify_logits: bool | None, log) -> dict:
    if verify_logits is None:
        verify_logits = plan.parameters <= LOGITS_CHECK_MAX_PARAMETERS
    if not verify_logits:
        return {}
    diff = compare_logits(plan, out)
    log(f"verified: the export reproduces the checkpoint's logits (max difference {diff:.3g})")
    return {"max_logit_diff": diff}


def compare_logits(plan: ExportPlan, out: Path) -> float:
    """transformers' fp32 load of the export, and the same model holding the checkpoint's weights rounded to the
    output dtype, on probe sequences: the largest logit difference (at most MAX_LOGIT_DIFF, or an ExportError)."""
    model, loading = load_causal_lm(out, torch.float32, output_loading_info=True,
                                    trust_remote_code=_remote_code(plan))
    wrong = sorted(loading.get("missing_keys", [])) + sorted(loading.get("unexpected_keys", []))
    if wrong:
        raise ExportError(f"{out}: transformers finds the export's tensors do not fit the model ({wrong[:3]})")
    model.eval()
    probe = torch.randint(0, model.config.vocab_size, PROBE_SHAPE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exported = model(input_ids=probe).logits
        state = {k: v for k, v in model.state_dict().items() if k in plan.sources}
        _load_into(state, plan.checkpoint)  # in place, in fp32
        for v in state.values():
            if v.is_floating_point():
                v.copy_(v.to(plan.dtype))  # rounded as the export was
        expected = model(input_ids=probe).logits
    diff = (exported - expected).abs().max().item()
    if not diff <= MAX_LOGIT_DIFF:
        raise ExportError(f"{out}: the exported model's logits differ from the checkpoint's by {diff:.3g}")
    return diff


def _remote_code(plan: ExportPlan) -> bool:
    """Whether the model is one of transformers' own or its code comes with it (config.json's auto_map)."""
    return bool(getattr(plan.model.config, "auto_map", None))


def _in_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A meta tensor of ``t``'s shape in the output dtype (floating-point tensors) or its own."""
    return torch.empty(t.shape, dtype=dtype if t.is_floating_point() else t.dtype, device="meta")


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
