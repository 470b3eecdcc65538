"""``keizoku quickstart``: every step of continual pre-training, on a CPU, on the bundled data, in about a minute.

The steps are the real commands' code paths, run in one process:

1. split the bundled Japanese and English samples into train and validation documents (JSONL);
2. ``tokenize`` them with the bundled 8k tokenizer (Megatron .bin/.idx);
3. make a tiny Llama-shaped "base" model: random weights pre-trained briefly on English (``train`` with
   ``model.init: random``, then ``export``);
4. continual pre-training of the base on Japanese with English replay (``train``), evaluating both
   validation sets before, during and after;
5. ``export`` to Hugging Face format (verified by reloading and comparing logits);
6. generate a continuation of a Japanese prompt with the base and the exported model through transformers;
then a plot of the losses and a summary with the next commands to run on real data.

Everything goes under ``--out``. ``quickstart.json`` there records each finished step, what it was made from
(the options and the bundled files' sizes) and its results; a rerun reuses finished steps whose inputs are
unchanged and redoes the rest, ``--force`` redoes all.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from keizoku.errors import KeizokuError
from keizoku.rundir import ExitCode, RunDir, discard, read_jsonl, write_atomic

ASSETS = Path(__file__).resolve().parent / "assets"
SAMPLES = {"ja": ASSETS / "data" / "ja_sample.jsonl.gz", "en": ASSETS / "data" / "en_sample.jsonl.gz"}
TOKENIZER = ASSETS / "tokenizer"
GPU_EXAMPLE = ASSETS / "examples" / "llama31_8b_cpt.yaml"
STATE_FILE = "quickstart.json"
# what --force may delete: only what quickstart writes
OWNED = ("data", "tokenized", "configs", "models", "runs", STATE_FILE)
PROMPT = "日本の首都である東京は、"

# the tiny base model: Llama-3 shaped (GQA, RoPE, SwiGLU, RMSNorm), 2.8M parameters with the 8k vocabulary
BASE_MODEL = dict(model_type="llama", vocab_size=8002, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, rope_theta=500000.0,
                  bos_token_id=8000, eos_token_id=8001, tie_word_embeddings=False)


class QuickstartError(KeizokuError, RuntimeError):
    pass


@dataclass
class Options:
    out: Path
    base_steps: int = 30
    steps: int = 60
    seq_length: int = 256
    global_batch_size: int = 8
    valid_every: int = 10  # every N-th document of each sample goes to validation
    replay: float = 0.1  # English share of the CPT blend
    force: bool = False


def run_quickstart(opts: Options, console: Console | None = None) -> dict:
    """Run (or reuse) every step; returns the summary shown at the end."""
    console = console or Console()
    t0 = time.perf_counter()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-tensor loading bars: noise next to the steps' own output
    out = opts.out.absolute()
    _prepare_out(out, opts.force)
    state = _State(out / STATE_FILE)
    qs = _Quickstart(opts, out, state, console)
    qs.step("1/6 split", "split the bundled samples into train and validation", qs.split)
    qs.step("2/6 tokenize", "keizoku tokenize: JSONL -> Megatron .bin/.idx", qs.tokenize, always=True)
    qs.step("3/6 base", "a tiny base model: random Llama pre-trained on English, exported to HF", qs.base)
    qs.step("4/6 cpt", "continual pre-training on Japanese with English replay", qs.cpt)
    qs.step("5/6 export", "keizoku export: checkpoint -> Hugging Face safetensors, logits verified", qs.export)
    qs.step("6/6 generate", "a Japanese prompt continued by the base and the CPT model (transformers)", qs.generate,
            always=True)
    plot = qs.plot()
    summary = qs.summary(plot, time.perf_counter() - t0)
    state.data["summary"] = summary
    state.save()
    _show_summary(summary, console)
    return summary


def _prepare_out(out: Path, force: bool) -> None:
    if out.exists() and not (out / STATE_FILE).exists() and any(out.iterdir()):
        raise QuickstartError(f"{out}: exists and is not a quickstart directory (no {STATE_FILE}); "
                              "choose another --out or empty it")
    if force:
        for name in OWNED:
            discard(out / name)
    out.mkdir(parents=True, exist_ok=True)


class _State:
    """quickstart.json: per step, the inputs it was made from and its results."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {"steps": {}}

    def save(self) -> None:
        write_atomic(self.path, json.dumps(self.data, indent=1, ensure_ascii=False) + "\n")


class _Quickstart:
    def __init__(self, opts: Options, out: Path, state: _State, console: Console):
        self.opts, self.out, self.state, self.console = opts, out, state, console
        self.upstream_changed = False
        self.results: dict[str, dict] = {}

    # ------------------------------------------------------------ step bookkeeping

    def step(self, title: str, what: str, fn, always: bool = False) -> None:
        """Run ``fn`` unless a previous run finished it from the same inputs and nothing before it was redone."""
        name = title.split()[1]
        inputs = self._inputs(name)
        done = self.state.data["steps"].get(name)
        self.console.rule(f"[bold]{title}[/bold] · {what}", align="left")
        if not always and not self.upstream_changed and done and done["inputs"] == inputs:
            self.console.print(f"reused (finished {done['finished']}, {done['seconds']:.1f} s); --force redoes it",
                               highlight=False)
            self.results[name] = done["result"]
            return
        start = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - start
        # an "always" step (cheap, with its own reuse) changes what follows only if its result changed
        self.upstream_changed |= not always or done is None or done["result"] != result
        self.results[name] = result
        self.state.data["steps"][name] = {"inputs": inputs, "result": result, "seconds": round(seconds, 2),
                                          "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
        self.state.save()
        self.console.print(f"[green]done[/green] in {seconds:.1f} s", highlight=False)

    def _inputs(self, name: str) -> dict:
        o = self.opts
        common = {"keizoku": _version()}
        return common | {
            "split": {"samples": {k: p.stat().st_size for k, p in SAMPLES.items()}, "valid_every": o.valid_every},
            "tokenize": {"tokenizer": _digest(TOKENIZER / "tokenizer.json")},
            "base": {"model": BASE_MODEL, "steps": o.base_steps, "seq": o.seq_length, "gbs": o.global_batch_size},
            "cpt": {"steps": o.steps, "seq": o.seq_length, "gbs": o.global_batch_size, "replay": o.replay},
            "export": {},
            "generate": {"prompt": PROMPT},
        }[name]

    # ------------------------------------------------------------ steps

    def split(self) -> dict:
        """Every valid_every-th document of each sample to validation, the rest to train (raw lines kept)."""
        data = self.out / "data"
        data.mkdir(exist_ok=True)
        counts = {}
        for lang, src in SAMPLES.items():
            with gzip.open(src, "rb") as f:
                lines = [line for line in f if line.strip()]
            parts = {"train": [ln for i, ln in enumerate(lines) if (i + 1) % self.opts.valid_every],
                     "valid": [ln for i, ln in enumerate(lines) if (i + 1) % self.opts.valid_every == 0]}
            for split, chosen in parts.items():
                write_atomic(data / f"{lang}_{split}.jsonl", b"".join(chosen))
                counts[f"{lang}_{split}"] = len(chosen)
            self.console.print(f"{src.name}: {len(parts['train'])} train + {len(parts['valid'])} validation "
                               f"documents -> {data}/{lang}_{{train,valid}}.jsonl", highlight=False)
        return {"documents": counts}

    def tokenize(self) -> dict:
        from keizoku.data.tokenize import TokenizeOptions, summarize, tokenize

        inputs = [str(self.out / "data" / f"{lang}_{split}.jsonl") for lang in SAMPLES for split in ("train", "valid")]
        opts = TokenizeOptions(inputs=inputs, tokenizer=str(TOKENIZER), output_dir=self.out / "tokenized")
        result = tokenize(opts, console=self.console, progress=self.console.is_terminal,
                              log=lambda m: self.console.print(m, highlight=False, markup=False, soft_wrap=True))
        datasets = {}
        for row in summarize(result):
            datasets[row["dataset"]] = {"documents": row["documents"], "tokens": row["tokens"]}
            self.console.print(f"{row['dataset']}: {row['documents']:,} documents, {row['tokens']:,} tokens "
                               f"({row['status']})", highlight=False)
        return {"datasets": datasets, "manifest": str(result.manifest)}

    def base(self) -> dict:
        """Random weights of BASE_MODEL's shape, trained on English with the real trainer, exported to HF."""
        from transformers import AutoConfig

        arch = self.out / "models" / "base-architecture"
        arch.mkdir(parents=True, exist_ok=True)
        AutoConfig.for_model(**BASE_MODEL).save_pretrained(arch)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(TOKENIZER / name, arch / name)
        run_dir = self._fresh_run("base")
        cfg = self._config("base", {
            "run_dir": str(run_dir),
            "model": {"hf_path": str(arch), "init": "random"},
            "data": {"blend": [{"path": self._dataset("en_train")}],
                     "validation": {"en": [{"path": self._dataset("en_valid")}]}},
            "train": {"max_steps": self.opts.base_steps},
            "optim": {"lr": 3e-3, "min_lr": 3e-4},
            "schedule": {"warmup_steps": _warmup(self.opts.base_steps)},
            "eval": {"interval": 0, "at_start": False},
        })
        self._train(cfg)
        export = self._export(run_dir, self.out / "models" / "base")
        final = _evals(run_dir)[-1]
        return {"run_dir": str(run_dir), "model": str(self.out / "models" / "base"), "en_valid_loss": final["en_loss"],
                "parameters": export["parameters"]}

    def cpt(self) -> dict:
        run_dir = self._fresh_run("cpt")
        cfg = self._config("cpt", {
            "run_dir": str(run_dir),
            "model": {"hf_path": str(self.out / "models" / "base")},
            "data": {"blend": [{"path": self._dataset("ja_train"), "weight": round(1 - self.opts.replay, 6)},
                               {"path": self._dataset("en_train"), "weight": self.opts.replay}],
                     "validation": {"ja": [{"path": self._dataset("ja_valid")}],
                                    "en": [{"path": self._dataset("en_valid")}]}},
            "train": {"max_steps": self.opts.steps},
            "optim": {"lr": 2e-3, "min_lr": 2e-4},
            "schedule": {"warmup_steps": _warmup(self.opts.steps)},
            "eval": {"interval": max(1, self.opts.steps // 3), "at_start": True},
        })
        self._train(cfg)
        shutil.copy(GPU_EXAMPLE, run_dir / GPU_EXAMPLE.name)
        evals = _evals(run_dir)
        train = [r for r in _metrics(run_dir) if r["kind"] == "train"]
        rates = sorted(r["tokens_per_s"] for r in train)
        return {"run_dir": str(run_dir), "config": str(RunDir(run_dir).config),
                "input_config": str(self.out / "configs" / "cpt.yaml"),
                "before": {k: evals[0][f"{k}_loss"] for k in ("ja", "en")},
                "after": {k: evals[-1][f"{k}_loss"] for k in ("ja", "en")},
                "tokens": train[-1]["tokens"], "tokens_per_s": rates[len(rates) // 2]}

    def export(self) -> dict:
        return self._export(Path(self.results["cpt"]["run_dir"]), self.out / "models" / "cpt")

    def generate(self) -> dict:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        texts = {}
        for name in ("base", "cpt"):
            path = self.out / "models" / name
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path).eval()
            ids = tokenizer(PROMPT, return_tensors="pt").input_ids
            torch.manual_seed(0)  # sampled, but the same text on every run
            with torch.no_grad():
                gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, do_sample=True,
                                     top_k=50, temperature=0.8, pad_token_id=tokenizer.eos_token_id)
            texts[name] = tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
            self.console.print(f"[bold]{name:>4}[/bold] model: {PROMPT}[cyan]{_one_line(texts[name])}[/cyan]",
                               highlight=False)
        self.console.print("(a 2.8M-parameter model after a minute on a CPU: expect word salad; what CPT changed "
                           "is which language the words come from)", highlight=False)
        return {"prompt": PROMPT, "continuations": texts}

    # ------------------------------------------------------------ helpers

    def _dataset(self, name: str) -> str:
        return str(self.out / "tokenized" / f"{name}_text_document")

    def _fresh_run(self, name: str) -> Path:
        """A run made from other inputs is removed: resuming it would mix two runs."""
        run_dir = self.out / "runs" / name
        discard(run_dir)
        return run_dir

    def _config(self, name: str, values: dict):
        """The step's YAML (the tiny CPU settings shared by both runs, then ``values``), written and loaded the
        way ``keizoku train CONFIG`` loads it."""
        from omegaconf import OmegaConf

        from keizoku.config import load_config

        common = {
            "engine": "torch",
            "data": {"seq_length": self.opts.seq_length, "num_workers": 0},
            "train": {"global_batch_size": self.opts.global_batch_size, "micro_batch_size": self.opts.global_batch_size,
                      "device": "cpu"},
            "schedule": {"kind": "cosine"},
            "checkpoint": {"interval": 0, "keep_last": 1},
            "eval": {"batches": 4},  # 4 x 8 sequences per validation set
            "logging": {"interval": 5, "tensorboard": False},
        }
        path = self.out / "configs" / f"{name}.yaml"
        merged = OmegaConf.merge(OmegaConf.create(common), OmegaConf.create(values))
        write_atomic(path, OmegaConf.to_yaml(merged))
        self.console.print(f"config: {path}", highlight=False)
        return load_config(path)

    def _train(self, cfg) -> None:
        from keizoku.engines import train

        status = train(cfg)
        if status != ExitCode.OK:
            raise QuickstartError(f"training {cfg.run_dir} ended with exit status {status}")

    def _export(self, run_dir: Path, out: Path) -> dict:
        from keizoku.engines import export

        info = export(run_dir, out, verify=True, overwrite=True,  # the quickstart's own folder: its earlier export
                      log=lambda m: self.console.print(m, highlight=False, markup=False, soft_wrap=True))
        return {"path": str(out), "step": info["step"], "max_logit_diff": info["max_logit_diff"],
                "parameters": _parameters(out)}

    # ------------------------------------------------------------ results

    def plot(self) -> Path:
        """RUN_DIR/loss.png of the CPT run: the plot ``keizoku report`` starts with (``keizoku.report.loss_figure``)."""
        from keizoku.report import write_loss_png

        run_dir = Path(self.results["cpt"]["run_dir"])
        return write_loss_png(run_dir, run_dir / "loss.png", "keizoku quickstart: continual pre-training of the tiny "
                              "base on Japanese", train_label="train loss (ja + en replay)")

    def summary(self, plot: Path, wall: float) -> dict:
        r = self.results
        steps = self.state.data["steps"]
        return {
            "out": str(self.out),
            "artifacts": {
                "split data": str(self.out / "data"),
                "tokenized datasets": str(self.out / "tokenized"),
                "base model (HF)": r["base"]["model"],
                "CPT run": r["cpt"]["run_dir"],
                "CPT model (HF)": r["export"]["path"],
                "loss plot": str(plot),
                "config used": r["cpt"]["input_config"],
                "GPU-scale example": str(Path(r["cpt"]["run_dir"]) / GPU_EXAMPLE.name),
            },
            "validation_loss": {"before": r["cpt"]["before"], "after": r["cpt"]["after"]},
            "tokens_per_s": r["cpt"]["tokens_per_s"],
            "cpt_tokens": r["cpt"]["tokens"],
            "max_logit_diff": r["export"]["max_logit_diff"],
            "generation": r["generate"],
            "wall_s": round(wall, 1),
            "step_seconds": {k: v["seconds"] for k, v in steps.items()},
        }


def _show_summary(s: dict, console: Console) -> None:
    console.rule("[bold]summary[/bold]", align="left")
    files = Table(show_header=False, box=None, pad_edge=False)
    for k, v in s["artifacts"].items():
        files.add_row(f"{k}:", v)
    console.print(files)
    losses = Table(title="validation loss (nats/token), base model -> after CPT", title_justify="left")
    for col in ("set", "before", "after", "change"):
        losses.add_column(col, justify="left" if col == "set" else "right")
    for lang in ("ja", "en"):
        b, a = s["validation_loss"]["before"][lang], s["validation_loss"]["after"][lang]
        losses.add_row(lang, f"{b:.3f}", f"{a:.3f}", f"{a - b:+.3f}")
    console.print(losses)
    console.print(f"CPT throughput: {s['tokens_per_s']:,.0f} tokens/s on this CPU ({s['cpt_tokens']:,} tokens); "
                  f"export reproduces the logits (max difference {s['max_logit_diff']:.2g}); "
                  f"wall time {s['wall_s']:.1f} s", highlight=False)
    a = s["artifacts"]
    console.print(
        "\n[bold]Next[/bold], on your own data (see the README):\n"
        f"  keizoku train {a['config used']}        # this run again: it finds it complete\n"
        "  keizoku tokenize corpus/ja/ --tokenizer meta-llama/Llama-3.1-8B --output-dir tokenized/ja\n"
        "  keizoku tokenize corpus/en/ --tokenizer meta-llama/Llama-3.1-8B --output-dir tokenized/en\n"
        f"  keizoku train {a['GPU-scale example']}\n"
        "  keizoku export runs/llama31-8b-ja-cpt --out llama31-8b-ja-hf", highlight=False, soft_wrap=True)


# ---------------------------------------------------------------- small helpers

def _metrics(run_dir: Path) -> list[dict]:
    return read_jsonl(RunDir(run_dir).metrics)


def _evals(run_dir: Path) -> list[dict]:
    return [r for r in _metrics(run_dir) if r["kind"] == "eval"]


def _parameters(model_dir: Path) -> int:
    from safetensors import safe_open

    total = 0
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            total += sum(math.prod(st.get_slice(key).get_shape()) for key in st.keys())
    return total


def _warmup(steps: int) -> int:
    return min(5, max(1, steps // 5))


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _version() -> str:
    from keizoku import __version__

    return __version__


def _one_line(text: str) -> str:
    return " ".join(text.split())
