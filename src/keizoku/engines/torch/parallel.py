"""Processes, devices and FSDP2: the torch engine's data parallelism.

``setup_distributed``: one process on a laptop (a private gloo group), or one rank of ``torchrun`` / ``keizoku
launch`` (``RANK``… in the environment; NCCL on GPUs). ``shard``: FSDP2 per decoder layer — each with its
activation checkpointing (``recompute``) and optionally compiled — the input embedding on its own when it is not
tied to the output layer, then the root. ``prepare_micro_batch``: how the gradients of a step's micro batches are
reduced (``parallel.grad_accumulation``, ``parallel.reshard_after_forward``). ``clip_grad_norm``: the global
gradient norm over every rank's shards.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import torch
import torch.distributed as dist

from keizoku.config import KeizokuConfig
from keizoku.engines.torch import TrainingError, recompute
from keizoku.engines.torch.loss import CausalLMWithLoss
from keizoku.engines.torch.model import decoder_layers


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device


def setup_distributed(cfg: KeizokuConfig) -> Dist:
    want_cuda = cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available())
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if want_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    backend = cfg.parallel.backend if cfg.parallel.backend != "auto" else ("nccl" if want_cuda else "gloo")
    if not dist.is_initialized():
        bind = {"device_id": device} if device.type == "cuda" else {}  # NCCL: no guessing rank -> GPU
        if "RANK" in os.environ:  # torchrun, or keizoku launch
            dist.init_process_group(backend, **bind)
        else:  # one process: a private store
            store = tempfile.mkdtemp(prefix="keizoku-pg-")
            dist.init_process_group(backend, init_method=f"file://{store}/store", rank=0, world_size=1, **bind)
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, device)


def shard(model: CausalLMWithLoss, cfg: KeizokuConfig, d: Dist, bf16: bool, compile: bool, reshard: bool) -> None:
    """FSDP2 per decoder layer, the untied input embedding, then the root: the wrapper, so the final norm and
    output layer (and a tied embedding) stay gathered from the body's forward through the loss."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(d.device.type, (d.world,))
    reduce_dtype = torch.bfloat16 if cfg.parallel.reduce_dtype == "bf16" else torch.float32
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=reduce_dtype) \
        if bf16 and d.device.type == "cuda" else MixedPrecisionPolicy()
    layers = decoder_layers(model.lm)
    try:
        modes = recompute.layer_modes(len(layers), cfg.model.activation_checkpointing, cfg.model.full_recompute_layers)
    except ValueError as e:
        raise TrainingError(str(e)) from None
    for i, mode in enumerate(modes):
        layer = layers[i] = recompute.wrap(layers[i], mode)
        if compile:
            layer.compile()
        fully_shard(layer, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard)
    embedding, output = model.lm.get_input_embeddings(), model.lm.get_output_embeddings()
    if output is None or embedding.weight is not output.weight:
        # its own unit: the gathered input embedding (1 GiB for Llama-3.1-8B) is not held from forward to backward
        fully_shard(embedding, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard)


def prepare_micro_batch(model, last: bool, reshard: bool, unsharded_accumulation: bool) -> None:
    """FSDP2's settings for the next micro batch's backward (``last``: the step's final one).

    Without reshard_after_forward all weights are gathered at each backward's start anyway: they stay so until the
    step's last backward (the next forward's gathers would queue behind this backward's reduce-scatters), and that
    forward need not wait for the last one (the output layer's, 1 GiB at 8B). Unsharded accumulation sums the
    micro batches' gradients unreduced and reduces once, at the last."""
    model.set_reshard_after_backward(last or reshard)
    model.set_is_last_backward(last or reshard)
    if unsharded_accumulation:
        model.set_requires_gradient_sync(last)


def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """Clips the gradients to ``max_norm`` (0: no clipping); returns their norm before clipping, on the device."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else float("inf"))
    return (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).float()
