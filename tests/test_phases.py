"""Phases and extensions (engine torch) through real `keizoku train` / `keizoku extend` processes on the CPU: each
phase trains on its own data with its part of the LR schedule in one run directory, a kill mid-anneal (or at the
boundary) resumes to the uninterrupted run's exact weights, the end of each phase is kept, and a finished run
extended with a re-warm follows the documented schedule step by step."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import yaml

from conftest import keizoku, tiny_llama_and_data
from test_train import config, final_weights, metrics

from keizoku.engines.torch.checkpoint import TEST_HOOK_ENV
from keizoku.rundir import committed_checkpoints, kept_reason

LR, MIN_LR = 3e-3, 3e-4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_llama_and_data(tmp_path_factory.mktemp("phases"))


def two_phases(setup: Path, run: Path) -> Path:
    """main: 6 steps of the ja/en blend (warmup 2, then constant); anneal: 6 steps of Japanese alone, linear to
    min_lr, with an English validation set besides."""
    path = config(setup, run, train__max_steps=None, checkpoint__interval=2, checkpoint__keep_last=1,
                  eval__interval=0)
    cfg = yaml.safe_load(path.read_text())
    ja, en = cfg["data"]["validation"]["ja"], cfg["data"]["validation"]["en"]
    del cfg["schedule"], cfg["train"]["max_steps"]
    cfg["data"]["validation"] = {"ja": ja}
    cfg["phases"] = [{"name": "main", "max_steps": 6, "warmup_steps": 2},
                     {"name": "anneal", "max_steps": 6, "blend": ja, "decay": "linear",
                      "validation": {"ja": ja, "en": en}}]
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def whole(setup, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("whole") / "run"
    keizoku("train", two_phases(setup, run))
    return run


def test_each_phase_trains_its_part_of_the_schedule_on_its_data(whole):
    train = metrics(whole, "train")
    assert [(r["step"], r["phase"]) for r in train] == [(k, "main" if k <= 6 else "anneal") for k in range(1, 13)]
    expected = [LR * (k + 1) / 2 for k in range(2)] + [LR] * 4 + [LR + (MIN_LR - LR) * k / 5 for k in range(6)]
    assert [r["lr"] for r in train] == pytest.approx(expected, rel=1e-9)
    # evaluated at the start, at the end of main on its sets, at the end on the anneal's sets
    evals = metrics(whole, "eval")
    assert [(e["step"], e["phase"], sorted(k for k in e if k.endswith("_loss"))) for e in evals] == [
        (0, "main", ["ja_loss"]), (6, "main", ["ja_loss"]), (12, "anneal", ["en_loss", "ja_loss"])]
    # keep_last 1, yet the end of main is kept; the checkpoints name their phase
    kept = {c.step: kept_reason(c.path) for c in committed_checkpoints(whole)}
    assert kept == {6: "the end of phase main", 12: "the end of phase anneal"}
    state = json.loads((whole / "checkpoints/step_00000006/trainer_state.json").read_text())
    assert state["phase"] == "main" and state["consumed_samples"] == 6 * 8
    plan = json.loads((whole / "schedule.json").read_text())
    assert [(s["name"], s["first_step"], s["last_step"]) for s in plan["segments"]] == [("main", 1, 6),
                                                                                        ("anneal", 7, 12)]
    assert (whole / "schedule.png").read_bytes()[:4] == b"\x89PNG"


def test_each_phase_draws_its_own_samples(whole, tmp_path):
    """The anneal's samples are its blend's (Japanese alone), drawn with its own seed: its first batch is samples
    48-55 (the run's consumed count, as Megatron-Bridge indexes them) of megatron-core's GPTDataset of that blend,
    seed data.seed + 1 and the run's samples up to the anneal's end."""
    import torch.distributed as dist

    from keizoku.config import load_config
    from keizoku.data import blend
    from keizoku.schedule import run_plan

    cfg = load_config(whole / "config.yaml")
    anneal = run_plan(cfg).segments[1]
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        shim = blend.MegatronTokenizerShim(8001, 8002, "x")
        ours, _ = blend.build(blend.segment_data(cfg, anneal), seq_length=64, train_samples=96, eval_samples=2,
                              tokenizer=shim, cache_dir=tmp_path / "a", seed=cfg.data.seed + 1)
        main_seed, _ = blend.build(blend.segment_data(cfg, anneal), seq_length=64, train_samples=96, eval_samples=2,
                                   tokenizer=shim, cache_dir=tmp_path / "b")
    finally:
        dist.destroy_process_group()
    first = [torch.as_tensor(ours[i]["tokens"]) for i in range(48, 56)]
    assert not all(torch.equal(a, torch.as_tensor(main_seed[48 + i]["tokens"])) for i, a in enumerate(first))
    # the model of step 6 on that batch gives the loss logged for step 7
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from transformers import AutoConfig, AutoModelForCausalLM

    dcp_to_torch_save(whole / "checkpoints/step_00000006", tmp_path / "w6.pt")
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(whole / "base-model"))
    model.load_state_dict(torch.load(tmp_path / "w6.pt", weights_only=False)["model"], strict=False)
    tokens = torch.stack(first)
    labels = torch.stack([torch.as_tensor(ours[i]["labels"]) for i in range(48, 56)])
    with torch.no_grad():
        logits = model(input_ids=tokens).logits
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten()).item()
    assert metrics(whole, "train")[6]["loss"] == pytest.approx(loss, rel=1e-4)


def test_a_kill_at_the_phase_boundary_resumes_to_the_uninterrupted_weights(setup, whole, tmp_path):
    """Killed while saving step 8: the run resumes from the end of main, step 6, and the anneal's loader starts
    there. (A kill mid-anneal: tests/test_quickstart.py::test_two_phase_example_end_to_end.)"""
    kill_at, resumed_from = 8, 6
    run = tmp_path / "run"
    cfg = two_phases(setup, run)
    proc = keizoku("train", cfg, check=False, env={**os.environ, TEST_HOOK_ENV: f"{kill_at}:staging:kill"})
    assert proc.returncode != 0
    assert committed_checkpoints(run)[-1].step == resumed_from
    out = keizoku("train", cfg).stdout
    assert f"resumed from {run}/checkpoints/step_{resumed_from:08d}" in out
    a, b = final_weights(whole, 12), final_weights(run, 12)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)
    assert [(r["step"], r["lr"], r["phase"]) for r in metrics(run, "train")] == \
        [(r["step"], r["lr"], r["phase"]) for r in metrics(whole, "train")]


def test_a_finished_run_extended_with_a_rewarm_follows_the_documented_schedule(setup, tmp_path):
    run = tmp_path / "run"
    cfg = config(setup, run, train__max_steps=8, checkpoint__interval=4, checkpoint__keep_last=1, eval__interval=0)
    keizoku("train", cfg)
    before = metrics(run, "train")
    # more steps by raising the length is refused: it would reshape the schedule from step 1
    refused = keizoku("train", cfg, "train.max_steps=14", check=False)
    assert refused.returncode == 2 and "keizoku extend RUN_DIR --steps N" in refused.stderr
    bad = keizoku("extend", run, "--steps", "6", "--lr", "1e-3", check=False)
    assert bad.returncode == 2 and "--lr is the peak of a re-warm" in bad.stderr
    out = keizoku("extend", run, "--steps", "6", "--rewarm-steps", "2", "--lr", "2e-3").stdout
    assert "extension extension-1: steps 9-14" in out and "warmup 2 from 0.0003 to 0.002, cosine to 0.0003" in out
    assert f"kept: {run}/checkpoints/step_00000008" in out
    history = [json.loads(line) for line in (run / "config-history.jsonl").read_text().splitlines()]
    assert history[-1]["act"] == "extend" and history[-1]["changes"]["extensions"][1][0]["warmup_steps"] == 2
    keizoku("train", cfg)  # the run's config file, unchanged: the run's record supplies the extension
    train = metrics(run, "train")
    assert train[:8] == before  # the steps trained before keep their records and rates
    # the documented re-warm: linear from the run's last rate (min_lr at its last step) to the peak over 2 steps,
    # then a cosine down to min_lr at the extension's last step
    end, peak = MIN_LR, 2e-3
    expected = [end + (peak - end) * (k + 1) / 2 for k in range(2)]
    expected += [MIN_LR + (peak - MIN_LR) * 0.5 * (1 + math.cos(math.pi * (k - 2) / 3)) for k in range(2, 6)]
    assert before[-1]["lr"] == pytest.approx(end)
    assert [r["lr"] for r in train[8:]] == pytest.approx(expected, rel=1e-9)
    assert [r["phase"] for r in train[8:]] == ["extension-1"] * 6
    kept = {c.step: kept_reason(c.path) for c in committed_checkpoints(run)}
    assert kept == {8: "the end of the run before extension-1", 14: "the end of extension extension-1"}
    status = keizoku("status", run).stdout  # the run's length includes its extension, from the run's own record
    assert "step 14 of 14 · phase extension-1" in status, status


def test_config_check_shows_the_example_phase_by_phase():
    """The example's phases, as `keizoku config check` prints them after the resolved config (YAML comments: the
    output still loads as a config)."""
    example = Path(__file__).resolve().parents[1] / "examples/ja_cpt_two_phase.yaml"
    out = keizoku("config", "check", example, "--no-inputs").stdout
    assert "#   phase main: steps 1-40 (40 steps, 81,920 tokens); LR warmup 4 from 0 to 0.002, constant" in out
    assert "#   phase anneal: steps 41-60 (20 steps, 40,960 tokens); LR from 0.002, linear to 0.0002" in out
    assert [p["name"] for p in yaml.safe_load(out)["phases"]] == ["main", "anneal"]
