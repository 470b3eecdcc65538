"""Filling a sharded model's weights: each rank allocates and fills only its own shard.

The model is built on the meta device (``model.model_skeleton``: no memory, no initialisation), FSDP2 shards it
(``parallel.shard``), ``materialize`` allocates each rank's shard on its device, and then one of

- ``load_pretrained``: this rank's slices of ``model.hf_path``'s safetensors files, read with
  torch.distributed.checkpoint's Hugging Face storage reader (safetensors' ``get_slice``: only the bytes of the
  slice are read, converted to the parameter's dtype slice by slice). A rank of N reads about 1/N of the bytes.
- ``init_random``: ``model.init: random``; each module's parameters are drawn at their full size, one module at a
  time (the model's own ``_init_weights``, a fixed seed, a fixed order), and each rank keeps its slice: the same
  weights for any number of ranks.
- nothing, when the run resumes (its checkpoint fills every parameter).

and in every case ``init_buffers``: what is not in a checkpoint (rotary tables, scaled-embedding factors) is
computed by the model's own code, as transformers does after loading (``initialize_weights``, which skips tensors
flagged ``_is_hf_initialized``).

Host memory per rank: the shard and one module's tensors; device memory: the shard plus one tensor being filled.
Needs transformers' initialisation flags (transformers >= 5) and checkpoint tensors named and shaped as the model's
parameters; ``unsupported`` says when that does not hold (e.g. a Mixtral checkpoint whose per-expert tensors
transformers 5 merges at load), and the trainer then loads the whole model, as before.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

from keizoku.engines.torch.model import ModelLoadError


@dataclass
class LoadReport:
    bytes_read: int  # this rank's, from the safetensors files
    bytes_total: int  # of the model's tensors in the files
    seconds: float


def unsupported(model: torch.nn.Module, hf_path: str | None, trust_remote_code: bool) -> str | None:
    """Why this model cannot be filled shard by shard from ``hf_path`` (None: it can; None path: random init)."""
    try:
        import transformers.initialization  # noqa: F401 - the flags initialize_weights respects (transformers 5)
    except ImportError:
        return "this transformers has no initialisation flags (transformers >= 5 loads shard by shard)"
    if trust_remote_code:
        return "model.trust_remote_code: the model's own code may initialise its tensors in ways keizoku cannot see"
    if hf_path is None:
        return None
    stored = _stored_tensors(hf_path)
    if not stored:
        return f"{hf_path} holds no *.safetensors files"
    missing = [k for k, shape in _parameter_shapes(model).items() if k not in stored]
    if missing:
        return (f"its parameters are not named as in {hf_path}'s files (e.g. {missing[0]}; transformers converts "
                "them at load)")
    wrong = [k for k, shape in _parameter_shapes(model).items() if tuple(stored[k]) != shape]
    if wrong:
        return f"{wrong[0]}'s shape in {hf_path}'s files differs from the model's"
    return None


def materialize(module: torch.nn.Module, device: torch.device) -> None:
    """Allocate every meta tensor of ``module`` on ``device``: each rank its shards (values undefined until filled)."""
    module.to_empty(device=device)


def load_pretrained(model: torch.nn.Module, hf_path: str) -> LoadReport:
    """Fill every parameter of the (sharded, materialised) model with this rank's slice of ``hf_path``'s tensors."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

    start = time.perf_counter()
    stored = _stored_tensors(hf_path)
    # `unsupported` found every parameter stored; what is not is a tied weight's second name, stored once
    state = {k: v for k, v in get_model_state_dict(model).items() if k in stored}
    reader = _CountingReader(str(hf_path))
    dcp.load(state, storage_reader=reader)
    set_model_state_dict(model, state, options=StateDictOptions(strict=False))  # the tied name is not in `state`
    _flag_initialized(model.parameters())
    total = sum(v.numel() * _stored_itemsize(reader, k) for k, v in state.items())
    return LoadReport(reader.bytes_read, total, time.perf_counter() - start)


@torch.no_grad()
def init_random(model: torch.nn.Module, seed: int, device: torch.device) -> None:
    """``model.init: random``: the model's own initialisation, drawn at full size module by module on ``device``
    from ``seed``, each rank keeping its slice; the same weights whatever the number of ranks."""
    torch.manual_seed(seed)
    for module in model.modules():
        own = {name: p for name, p in module.named_parameters(recurse=False)}
        if not own:
            continue
        full = {name: torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=device)) for name, p in own.items()}
        for name, p in full.items():
            module._parameters[name] = p
        try:
            model._init_weights(module)
        finally:
            for name, p in own.items():
                module._parameters[name] = p
        for name, p in own.items():
            _copy_into_shard(p, full[name])
    _flag_initialized(model.parameters())


def init_buffers(model: torch.nn.Module, parameters_filled: bool) -> None:
    """Compute what the model's own code computes and no checkpoint holds (rotary tables, embedding scales).
    ``parameters_filled`` False (a resumed run: its checkpoint fills them next) flags the parameters so that they
    are left as they are."""
    if not parameters_filled:
        _flag_initialized(model.parameters())
    model.initialize_weights()


def _copy_into_shard(param: torch.Tensor, full: torch.Tensor) -> None:
    if isinstance(param, DTensor):
        local = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local()
        param.to_local().copy_(local)
    else:
        param.copy_(full)


def _flag_initialized(tensors) -> None:
    for t in tensors:
        t._is_hf_initialized = True


def _parameter_shapes(model: torch.nn.Module) -> dict[str, tuple]:
    """{state-dict name: full shape} of each parameter, a tied one under its first name."""
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def _stored_tensors(hf_path: str) -> dict[str, list[int]]:
    """{tensor name: shape} over the safetensors files of a HF checkpoint directory (headers only)."""
    from safetensors import safe_open

    out = {}
    for path in sorted(Path(hf_path).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            out.update({k: f.get_slice(k).get_shape() for k in f.keys()})
    return out


def _stored_itemsize(reader, key: str) -> int:
    return reader.metadata.state_dict_metadata[key].properties.dtype.itemsize


try:
    from torch.distributed.checkpoint import HuggingFaceStorageReader
except ImportError:  # torch < 2.8
    HuggingFaceStorageReader = object  # type: ignore[misc,assignment]


class _CountingReader(HuggingFaceStorageReader):
    """torch's Hugging Face storage reader that counts the bytes of the slices this rank reads."""

    def __init__(self, path: str):
        if HuggingFaceStorageReader is object:
            raise ModelLoadError("model.hf_path: loading shard by shard needs torch >= 2.8 "
                                 "(torch.distributed.checkpoint.HuggingFaceStorageReader)")
        super().__init__(path)
        self.bytes_read = 0

    def read_metadata(self):
        self.metadata = super().read_metadata()
        return self.metadata

    def read_data(self, plan, planner):
        for item in plan.items:  # each a slice of one stored tensor that this rank reads
            itemsize = self.metadata.state_dict_metadata[item.storage_index.fqn].properties.dtype.itemsize
            self.bytes_read += math.prod(item.lengths) * itemsize
        return super().read_data(plan, planner)
