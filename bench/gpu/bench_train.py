"""Throughput of `keizoku train` (engine: torch) against what users would run instead, one machine, one call.

Variants (each in its own process, one after another, so memory and compile caches do not leak):
  keizoku    the real `keizoku train` code path (keizoku.engines.train on a YAML config): megatron-core data
             loader over the bundled samples tokenized, AdamW, metrics; checkpoints and eval off. Extra
             ``key=value`` overrides name sub-variants (e.g. keizoku:train.loss_chunk_tokens=0).
  hf         Hugging Face Trainer, bf16=True, gradient checkpointing (what most users pick), random tokens.
  fsdp       a plain FSDP2 loop, per-layer torch.compile, full fp32 logits + F.cross_entropy, random tokens.
             Options after a colon: ``eager`` (no compile), ``ac`` (activation checkpointing of every layer, what
             8B needs in 80 GB), ``chunked`` (then the same process and model with keizoku's chunked loss).
``--profile``: a torch.profiler summary of one step of each variant (keizoku: also its GPU kernel time by category).
With ``--world N`` > 1 each variant runs under torchrun on N GPUs (FSDP2 over them; HF Trainer with FSDP).
``--mem-cap-gib`` caps every variant's GPU memory (an H100's 78 GiB on an H200).
``--baseline-src DIR``: variants named ``keizoku@base`` run the keizoku source tree in DIR instead of this checkout's
``src`` (e.g. ``git archive <commit> src | tar -x -C .bench-gpu/base``, then ``--baseline-src .bench-gpu/base/src``):
a change measured against the commit before it, side by side on one machine.
All share the Llama shape, micro batch, global batch, optimizer (fused AdamW, fp32 master weights, bf16 compute).
Reported: median step time over the steps after ``--warmup``, tokens/s/GPU, MFU (6·N + 12·L·H·S per token, N
without the input embedding, output layer included; 989.4 TFLOP/s), peak allocated memory, card.

  python3 bench/gpu/bench_train.py --shape 1b --seq 8192 --micro 2 --global-batch 4 --steps 20 \
      --variants keizoku hf fsdp --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PEAK = 989.4e12
SHAPES = {
    "0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),  # Qwen2.5-0.5B's sizes
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),
    "3b": dict(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
               num_attention_heads=24, num_key_value_heads=8, tie_word_embeddings=True),  # Llama-3.2-3B's sizes
    "8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
    "tiny": dict(vocab_size=8002, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
}


def llama_config(shape: str, seq: int):
    from transformers import LlamaConfig

    return LlamaConfig(**SHAPES[shape], max_position_embeddings=max(seq, 8192), rope_theta=500000.0,
                       bos_token_id=1, eos_token_id=2)


def flops_per_token(shape: str, seq: int) -> float:
    s = SHAPES[shape]
    h, f, L, v = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"], s["vocab_size"]
    kv = h // s["num_attention_heads"] * s["num_key_value_heads"]
    n = L * (h * (2 * h + 2 * kv) + 3 * h * f + 2 * h) + h + v * h  # layers, final norm, output layer
    return 6 * n + 12 * L * h * seq


def rank() -> int:
    return int(os.environ.get("RANK", 0))


def summary(name: str, a, step_times: list[float], memory_gib: float) -> dict:
    import torch

    tokens = a.global_batch * a.seq
    med = statistics.median(step_times)
    tps = tokens / med / a.world
    return {"variant": name, "card": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "gpus": a.world, "shape": a.shape, "seq": a.seq, "micro": a.micro, "global_batch": a.global_batch,
            "steps_timed": len(step_times), "median_step_s": med, "tokens_s_gpu": tps,
            "mfu": tps * flops_per_token(a.shape, a.seq) / PEAK, "peak_mem_gib": memory_gib,
            # the allocator had to free its cache and retry (memory at the card's limit / the --mem-cap-gib cap)
            "alloc_retries": torch.cuda.memory_stats().get("num_alloc_retries", 0) if torch.cuda.is_available() else 0}


# --- keizoku: the real train path --------------------------------------------------------------------------

def keizoku_config(run_dir: Path, model_dir: Path, data: Path, seq: int, micro: int, global_batch: int,
                   steps: int) -> dict:
    """The bench's `keizoku train` config: random init, the ja/en sample blend (0.9/0.1), logging every step,
    no checkpoints, no eval (also used by loss_curve.py)."""
    return {
        "run_dir": str(run_dir),
        "model": {"hf_path": str(model_dir), "init": "random"},
        "data": {"blend": [{"path": str(data / "ja_sample_text_document"), "weight": 0.9},
                           {"path": str(data / "en_sample_text_document"), "weight": 0.1}],
                 "seq_length": seq, "num_workers": 2},
        "train": {"global_batch_size": global_batch, "micro_batch_size": micro, "max_steps": steps},
        "checkpoint": {"interval": 0, "save_at_end": False},
        "eval": {"interval": 0, "at_start": False},
        "logging": {"interval": 1, "tensorboard": False},
    }


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja")


def write_model_dir(model_dir: Path, shape: str, seq: int, tokenizer: Path = ROOT / "src/keizoku/assets/tokenizer"):
    """A Hugging Face model directory for ``init: random``: the shape's LlamaConfig and the tokenizer's files."""
    llama_config(shape, seq).save_pretrained(model_dir)
    for f in TOKENIZER_FILES:
        if (tokenizer / f).is_file():
            (model_dir / f).write_bytes((tokenizer / f).read_bytes())


def run_keizoku(a, overrides: list[str]) -> list[dict]:
    import yaml

    from keizoku import config, engines

    # a --baseline-src tree from before keizoku's names changed (issue 19) has load/run/launch.progress.read_jsonl
    load_config = getattr(config, "load_config", None) or config.load
    train_engine = getattr(engines, "train", None) or engines.run
    try:
        from keizoku.rundir import read_jsonl
    except ImportError:
        from keizoku.launch.progress import read_jsonl

    work = Path(a.workdir)  # one per variant, the same for all its ranks
    if not rank():
        import keizoku

        print(f"keizoku from {Path(keizoku.__file__).parent}", flush=True)
    if a.profile:  # the last step, left out of the median below
        overrides = [*overrides, f"logging.profile_step={a.steps}", f"logging.profile_ranks=[{a.profile_ranks}]"]
    cfg = keizoku_config(work / "run", work / "model", Path(a.data), a.seq, a.micro, a.global_batch, a.steps)
    if not rank():
        write_model_dir(work / "model", a.shape, a.seq)
        (work / "cfg.tmp").write_text(yaml.safe_dump(cfg))
        (work / "cfg.tmp").rename(work / "cfg.yaml")
    while not (work / "cfg.yaml").exists():
        time.sleep(0.2)
    if a.sm_carveout is not None:  # an experiment, not a keizoku setting (yet): SMs the GEMMs leave to NCCL
        import torch

        torch._C._set_sm_carveout_experimental(a.sm_carveout)
    code = train_engine(load_config(work / "cfg.yaml", overrides))
    if code:
        raise SystemExit(f"keizoku train exited {code}")
    if rank():
        return []
    train = [r for r in read_jsonl(work / "run/metrics.jsonl") if r["kind"] == "train"]
    train = train[a.warmup:len(train) - (1 if a.profile else 0)]
    name = a.one.partition(":")[0] + ("[" + ",".join(overrides) + "]" if overrides else "") \
        + (f" sm_carveout={a.sm_carveout}" if a.sm_carveout is not None else "")
    if a.profile and a.out:
        table = (work / f"run/profile/rank0-step{a.steps}.txt").read_text()
        categories = kernel_time_by_category(work / f"run/profile/rank0-step{a.steps}.trace.json.gz")
        Path(a.out, f"profile-{work.name}.txt").write_text(f"{name}\n{categories}\n{table}")
        for r in (a.profile_ranks.split(",") if a.keep_trace else []):
            trace = work / f"run/profile/rank{r}-step{a.steps}.trace.json.gz"
            deadline = time.time() + 120  # another rank may still be writing its own
            while not trace.exists() and time.time() < deadline:
                time.sleep(1)
            shutil.copy(trace, Path(a.out, f"trace-{work.name}-rank{r}.json.gz"))
        print(f"=== profile: {name}, step {a.steps}, rank 0 ===\n{categories}", flush=True)
    return [summary(name, a, [r["step_s"] for r in train], max(r.get("memory_gib", 0.0) for r in train))]


KERNEL_CATEGORIES = (("matmul", ("gemm", "nvjet", "xmma", "cutlass")), ("attention", ("flash", "fmha", "sdpa", "attn")),
                     ("nccl", ("nccl",)),
                     # FP8 scaling: the amax reductions and the saturating casts (clamp), often fused with a producer
                     ("fp8 amax/cast (triton)", ("triton_red_fused_abs", "clamp")), ("compiled (triton)", ("triton",)))


def kernel_time_by_category(trace: Path) -> str:
    """GPU kernel time of a keizoku profile trace, summed by kernel-name category (kernels on the NCCL stream
    overlap compute, so the categories add up to more than the step)."""
    import gzip

    events = json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]
    totals: dict[str, float] = {}
    streams: dict[object, float] = {}
    matmul_by_stream: dict[object, float] = {}
    start, end = float("inf"), 0.0
    for e in events:
        if e.get("cat") != "kernel":
            continue
        name = e["name"].lower()
        cat = next((c for c, keys in KERNEL_CATEGORIES if any(k in name for k in keys)), "other")
        totals[cat] = totals.get(cat, 0.0) + e.get("dur", 0) / 1e3
        streams[e.get("tid")] = streams.get(e.get("tid"), 0.0) + e.get("dur", 0) / 1e3
        if cat == "matmul":
            matmul_by_stream[e.get("tid")] = matmul_by_stream.get(e.get("tid"), 0.0) + e.get("dur", 0)
        start, end = min(start, e["ts"]), max(end, e["ts"] + e.get("dur", 0))
    lines = [f"{c:24} {ms:10.1f} ms" for c, ms in sorted(totals.items(), key=lambda x: -x[1])]
    # the compute stream (the one running the matmuls) is idle for the rest of the span: waiting on the CPU or a
    # collective
    compute = max(matmul_by_stream, key=matmul_by_stream.get, default=None)
    lines.append(f"{'compute stream busy':24} {streams.get(compute, 0.0):10.1f} ms of {(end - start) / 1e3:.1f} ms "
                 "from the first kernel to the last")
    return "\n".join(lines)


# --- baselines ---------------------------------------------------------------------------------------------

def random_tokens(a, n: int, device):
    import torch

    g = torch.Generator().manual_seed(0)
    return torch.randint(0, SHAPES[a.shape]["vocab_size"], (n, a.micro, a.seq + 1), generator=g).to(device)


def run_hf(a) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    # random init on the GPU (8B: seconds, where a CPU takes minutes); Trainer's FSDP shards it from there
    with torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))):
        model = AutoModelForCausalLM.from_config(llama_config(a.shape, a.seq), attn_implementation="sdpa",
                                                 dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    vocab = SHAPES[a.shape]["vocab_size"]

    class Random(torch.utils.data.Dataset):
        def __len__(self):
            return a.global_batch * a.steps

        def __getitem__(self, i):
            t = torch.randint(0, vocab, (a.seq,), generator=g)
            return {"input_ids": t, "labels": t}

    times: list[float] = []
    sharding = {}
    if a.world > 1:  # what HF users do on several GPUs: Trainer's FSDP, each decoder layer a unit
        sharding = dict(fsdp="full_shard auto_wrap",
                        fsdp_config={"transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"], "use_orig_params": True})

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)

    args = TrainingArguments(output_dir=tempfile.mkdtemp(prefix="hf-bench-"), per_device_train_batch_size=a.micro,
                             gradient_accumulation_steps=a.global_batch // (a.micro * a.world), max_steps=a.steps,
                             bf16=True,
                             gradient_checkpointing=True, optim="adamw_torch_fused", learning_rate=3e-4,
                             lr_scheduler_type="cosine", logging_steps=5, save_strategy="no", report_to=[],
                             dataloader_num_workers=2, max_grad_norm=1.0, **sharding)
    Trainer(model=model, args=args, train_dataset=Random(), callbacks=[Clock()]).train()
    if rank():
        return []
    return [summary("hf-trainer-bf16-gc" + ("-fsdp" if sharding else ""), a, times[a.warmup:],
                    torch.cuda.max_memory_allocated() / 2**30)]


def run_fsdp(a, options: list[str]) -> list[dict]:
    import torch
    import torch.distributed as dist
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import AutoModelForCausalLM

    from keizoku.engines.torch.loss import CausalLMWithLoss

    compile, ac, chunked_too = "eager" not in options, "ac" in options, "chunked" in options
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if "RANK" in os.environ:
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("nccl", init_method=f"file://{tempfile.mkdtemp()}/s", rank=0, world_size=1)
    torch.manual_seed(0)
    with torch.device("cuda"):  # random init on the GPU: seconds instead of minutes for 8B (not timed anyway)
        model = AutoModelForCausalLM.from_config(llama_config(a.shape, a.seq), attn_implementation="sdpa",
                                                 dtype=torch.float32)
    model.config.use_cache = False  # else each layer's cache state makes dynamo recompile until its limit
    wrapped = CausalLMWithLoss(model, chunk=2048, compile=compile)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for i, layer in enumerate(model.model.layers):
        if ac:
            layer = model.model.layers[i] = checkpoint_wrapper(layer)
        if compile:
            layer.compile()
        fully_shard(layer, mp_policy=mp)
    fully_shard(wrapped, mp_policy=mp)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True)
    accum = a.global_batch // (a.micro * a.world)
    torch.manual_seed(rank())
    data = random_tokens(a, 4, "cuda")

    def step(i: int, chunked: bool):
        for k in range(accum):
            batch = data[(i * accum + k) % len(data)]
            x, y = batch[:, :-1], batch[:, 1:]
            wrapped.chunk = 2048 if chunked else 0  # 0: model(...).logits.float(), F.cross_entropy (sum)
            loss = wrapped(x, y) / y.numel()
            (loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    out = []
    base = "fsdp2" + ("-compile" if compile else "-eager") + ("-ac" if ac else "")
    for chunked in ((False, True) if chunked_too else (False,)):
        torch.cuda.reset_peak_memory_stats()
        times = []
        for i in range(a.steps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            loss = step(i, chunked)
            loss.item()
            times.append(time.perf_counter() - t0)
        name = base + ("+chunked-loss" if chunked else "")
        out.append(summary(name, a, times[a.warmup:], torch.cuda.max_memory_allocated() / 2**30))
        print(json.dumps(out[-1]), flush=True)
        if a.profile and not rank():
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                step(0, chunked)
                torch.cuda.synchronize()
            table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60)
            print(f"=== profile: {name}, one step ===\n{table}", flush=True)
            if a.out:
                Path(a.out, f"profile-{name}.txt").write_text(table)
    dist.destroy_process_group()
    return [] if rank() else out


# --- driver ------------------------------------------------------------------------------------------------

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--micro", type=int, default=2)
    p.add_argument("--global-batch", type=int, default=4, help="per step, all GPUs")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=4, help="steps left out of the median")
    p.add_argument("--world", type=int, default=1, help="GPUs (torchrun --nproc-per-node)")
    p.add_argument("--mem-cap-gib", type=float, help="cap each process's GPU memory (e.g. 78: an H100 on an H200)")
    p.add_argument("--data", default=str(ROOT / ".bench-gpu/data"), help="keizoku-tokenized samples")
    p.add_argument("--variants", nargs="+", default=["keizoku", "hf", "fsdp"],
                   help="keizoku, keizoku:KEY=VALUE[,KEY=VALUE], hf, fsdp, fsdp:eager,ac,chunked")
    p.add_argument("--profile", action="store_true", help="torch.profiler summary of one step per variant (keizoku: "
                   "the last step, via logging.profile_step; fsdp: one more step per loss)")
    p.add_argument("--profile-ranks", default="0", help="with --profile: the ranks that record it, e.g. 0,1 "
                   "(the kernel summary is rank 0's)")
    p.add_argument("--sm-carveout", type=int, help="keizoku variants: cuBLAS GEMMs leave this many SMs free "
                   "(torch._C._set_sm_carveout_experimental), e.g. for NCCL's kernels")
    p.add_argument("--keep-trace", action="store_true", help="with --profile: copy the profiled ranks' traces to --out")
    p.add_argument("--baseline-src", help="the keizoku source tree that keizoku@base variants run")
    p.add_argument("--out", default=os.environ.get("OUT"))
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one variant in this process
    p.add_argument("--workdir", help=argparse.SUPPRESS)  # internal: that variant's scratch directory
    a = p.parse_args()
    if a.one:
        kind, _, extra = a.one.partition(":")
        if a.mem_cap_gib:
            import torch

            dev = int(os.environ.get("LOCAL_RANK", 0))
            total = torch.cuda.get_device_properties(dev).total_memory / 2**30
            torch.cuda.set_per_process_memory_fraction(min(1.0, a.mem_cap_gib / total), dev)
        rows = {"keizoku": lambda: run_keizoku(a, extra.split(",") if extra else []),  # keizoku@base too
                "hf": lambda: run_hf(a), "fsdp": lambda: run_fsdp(a, extra.split(","))}[kind.removesuffix("@base")]()
        for row in rows:
            print("RESULT " + json.dumps(row), flush=True)
        return
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
    results = []
    for v in a.variants:
        t0 = time.perf_counter()
        launcher = [sys.executable] if a.world == 1 else \
            [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={a.world}"]
        cmd = [*launcher, __file__, *sys.argv[1:], "--one", v, "--workdir", tempfile.mkdtemp(prefix="kz-bench-")]
        env = dict(os.environ)
        if v.startswith("keizoku@base"):
            if not a.baseline_src:
                p.error(f"variant {v}: needs --baseline-src")
            env["PYTHONPATH"] = os.pathsep.join([str(Path(a.baseline_src).resolve()), env.get("PYTHONPATH", "")])
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        log = proc.stdout + proc.stderr
        if a.out:
            Path(a.out, f"log-{v.split(':')[0].replace('@', '-')}{len(results)}.txt").write_text(log)
        rows = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not rows:
            print(f"--- {v} failed (exit {proc.returncode}):\n{log[-3000:]}", flush=True)
        for row in rows:
            row["wall_s"] = round(time.perf_counter() - t0, 1)
            results.append(row)
            print(json.dumps(row), flush=True)
        if a.out:
            Path(a.out, "results.json").write_text(json.dumps(results, indent=1))
    print(f"\n{'variant':44} {'step s':>7} {'tok/s/GPU':>10} {'MFU':>6} {'mem GiB':>8}  card")
    for r in results:
        print(f"{r['variant']:44} {r['median_step_s']:7.3f} {r['tokens_s_gpu']:10,.0f} {r['mfu']:6.1%} "
              f"{r['peak_mem_gib']:8.1f}  {r['card']}")


if __name__ == "__main__":
    main()
