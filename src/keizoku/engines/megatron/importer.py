"""HF checkpoint → Megatron checkpoint, once per HF checkpoint, cached by its fingerprint.

``keizoku convert import --engine megatron HF --out DIR`` and the first ``keizoku train`` of a megatron run
do the same: AutoBridge reads the HF weights into a Megatron model (tensor/pipeline parallel 1, on the CPU)
and Bridge's ``save_megatron_model`` writes it as a ``torch_dist`` checkpoint, which Megatron reshards to any
parallel layout when training loads it. The directory is written under a temporary name and renamed when
complete, with ``keizoku-import.json`` (what it was made from); a later run finds it by the fingerprint and
does not import again.

The fingerprint identifies the HF checkpoint by content, cheaply enough for 140 GB: config.json, and for each
weight file its name, size, safetensors header (every tensor's name, dtype, shape and offsets) and a sha256 of
64 KiB samples spread through the file. Copying the checkpoint elsewhere keeps the fingerprint; changing a
weight changes it (up to the sampling: a change in bytes no sample covers is not seen — delete the import to
force a new one).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

from keizoku.engines.megatron import MegatronError
from keizoku.rundir import MEGATRON_TRACKER, discard, publish, staging_path

IMPORT_INFO = "keizoku-import.json"
FAILED_SUFFIX = ".failed"
_SAMPLES, _SAMPLE_BYTES = 64, 1 << 16
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


class ImportError_(MegatronError):  # noqa: N801 - ImportError is Python's
    """The HF checkpoint cannot be imported; the message says why."""


def fingerprint(hf_path: str | os.PathLike) -> str:
    """Content fingerprint of a local HF checkpoint directory (see the module docstring)."""
    root = Path(hf_path)
    if not (root / "config.json").is_file():
        raise ImportError_(f"model.hf_path: {root} is not a local Hugging Face checkpoint (no config.json); the "
                           "megatron engine imports from a directory (download hub models first)")
    h = hashlib.sha256()
    h.update((root / "config.json").read_bytes())
    weights = sorted(p for p in root.iterdir() if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES))
    if not weights:
        raise ImportError_(f"model.hf_path: {root} holds no weight files (*.safetensors, *.bin)")
    for path in weights:
        size = path.stat().st_size
        h.update(f"{path.name}\0{size}\0".encode())
        with open(path, "rb") as f:
            if path.name.endswith(".safetensors") and size >= 8:
                (header_len,) = struct.unpack("<Q", f.read(8))
                h.update(f.read(min(header_len, size - 8)))
            for i in range(_SAMPLES):
                f.seek(max(0, (size - _SAMPLE_BYTES) * i // max(_SAMPLES - 1, 1)))
                h.update(f.read(_SAMPLE_BYTES))
    return h.hexdigest()


def cache_dir(import_root: str | os.PathLike, hf_fingerprint: str, bridge_release: str) -> Path:
    """Where the import of this HF checkpoint by this Bridge release lives."""
    return Path(import_root) / f"{hf_fingerprint[:16]}-bridge{bridge_release}"


def is_complete(path: Path) -> bool:
    return (path / IMPORT_INFO).is_file() and (path / MEGATRON_TRACKER).is_file()


def import_hf(hf_path: str, out: Path, *, transformer_impl: str, trust_remote_code: bool,
              tokenizer: str | None = None, log=print) -> Path:
    """Import ``hf_path`` into ``out`` (one process, one GPU). ``out`` appears only when complete."""
    import torch

    from keizoku.engines.megatron import versions
    from keizoku.engines.megatron.container import apply_to_provider, hf_bridge
    from keizoku.engines.megatron.plan import impl_settings

    found = versions.detect()
    out = Path(out)
    if is_complete(out):
        log(f"keizoku: {out} is already a complete import; nothing to do")
        return out
    if not torch.cuda.is_available():
        raise ImportError_("the Megatron import needs a CUDA GPU (Megatron-Core's model set-up calls CUDA)")
    hf_fp = fingerprint(hf_path)
    staged = staging_path(out)
    discard(staged)
    staged.parent.mkdir(parents=True, exist_ok=True)
    single_process_env()
    start = time.perf_counter()
    bridge = hf_bridge(hf_path, trust_remote_code)
    provider = bridge.to_megatron_provider(load_weights=True)
    apply_to_provider(provider, {**impl_settings(transformer_impl), "tensor_model_parallel_size": 1,
                                 "pipeline_model_parallel_size": 1})
    provider.finalize()
    model = provider.provide_distributed_model(wrap_with_ddp=False, use_cpu_initialization=True)
    bridge.save_megatron_model(model, str(staged), hf_tokenizer_path=str(tokenizer or hf_path))
    info = {"hf_path": str(Path(hf_path).absolute()), "hf_fingerprint": hf_fp, "bridge": str(found),
            "parameters": sum(p.numel() for m in model for p in m.parameters()),
            "seconds": round(time.perf_counter() - start, 1)}
    (staged / IMPORT_INFO).write_text(json.dumps(info, indent=1) + "\n")
    publish(staged, out, replace=True)
    log(f"keizoku: imported {hf_path} into {out} ({info['parameters']:,} parameters, {info['seconds']} s)")
    return out


def import_for_cli(hf_path: str, *, out: Path | None = None, import_dir: Path | None = None,
                   transformer_impl: str = "transformer_engine", trust_remote_code: bool = False,
                   tokenizer: str | None = None, log=print) -> Path:
    """``keizoku convert import``: into ``out``, or into the cache ``import_dir`` that runs with
    ``megatron.import_dir`` look in (this checkpoint's fingerprint and the Bridge release name the subdirectory)."""
    from keizoku.engines.megatron import versions

    if import_dir is not None:
        out = cache_dir(import_dir, fingerprint(hf_path), versions.detect().release)
    return import_hf(hf_path, out, transformer_impl=transformer_impl, trust_remote_code=trust_remote_code,
                     tokenizer=tokenizer, log=log)


def single_process_env() -> None:
    """The environment of a one-rank process group (env://), whatever launched us."""
    import socket

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(key, None)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def ensure_import(hf_path: str, import_root: Path, bridge_release: str, *, rank: int, transformer_impl: str,
                  trust_remote_code: bool, tokenizer: str | None, timeout_s: float = 6 * 3600, log=print) -> Path:
    """The cached import for ``hf_path``, made now if missing: global rank 0 imports in a child process (its
    own one-GPU process group), the other ranks wait for the directory to appear (a shared filesystem)."""
    target = cache_dir(import_root, fingerprint(hf_path), bridge_release)
    failed = target.with_name(target.name + FAILED_SUFFIX)
    if is_complete(target):
        return target
    if rank == 0:
        failed.unlink(missing_ok=True)
        log(f"keizoku: importing {hf_path} to Megatron format in {target} (once per HF checkpoint)")
        cmd = [sys.executable, "-m", "keizoku", "convert", "import", "--engine", "megatron", str(hf_path),
               "--out", str(target), "--transformer-impl", transformer_impl]
        if trust_remote_code:
            cmd.append("--trust-remote-code")
        if tokenizer:
            cmd += ["--tokenizer", str(tokenizer)]
        env = dict(os.environ)
        env["CUDA_VISIBLE_DEVICES"] = _local_gpu(env)
        proc = subprocess.run(cmd, env=env)
        if proc.returncode != 0 or not is_complete(target):
            failed.write_text(f"exit status {proc.returncode}\n")
            raise ImportError_(f"importing {hf_path} into {target} failed (exit status {proc.returncode}); see the "
                               "output above")
        return target
    deadline = time.monotonic() + timeout_s
    while not is_complete(target):
        if failed.exists():
            raise ImportError_(f"rank 0 failed to import {hf_path} into {target}")
        if time.monotonic() > deadline:
            raise ImportError_(f"waited {timeout_s:.0f} s for rank 0 to import {hf_path} into {target}; is "
                               f"{import_root} on a filesystem every node sees?")
        time.sleep(5)
    return target


def _local_gpu(env: dict) -> str:
    """This rank's GPU, as the child should see it (only that one)."""
    local = int(env.get("LOCAL_RANK", 0))
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible:
        ids = [x for x in visible.split(",") if x.strip()]
        return ids[local % len(ids)]
    return str(local)
