"""`keizoku quickstart` end to end, with fewer steps than the default (same code path)."""

import json
from pathlib import Path

import pytest
import torch

from conftest import keizoku

FEW = ("--steps", "8", "--base-steps", "4")


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    out = tmp_path_factory.mktemp("qs") / "out"
    proc = keizoku("quickstart", "--out", out, *FEW)
    return out, proc


def test_every_step_runs_and_the_summary_names_real_artifacts(quickstart):
    out, proc = quickstart
    state = json.loads((out / "quickstart.json").read_text())
    assert list(state["steps"]) == ["split", "tokenize", "base", "cpt", "export", "generate"]
    s = state["summary"]
    for name, path in s["artifacts"].items():
        assert Path(path).exists(), name
    assert str(out) in proc.stdout  # the summary tells where things are
    # the plot is a real PNG
    assert (out / "runs/cpt/loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the split keeps every document, once
    docs = state["steps"]["split"]["result"]["documents"]
    assert docs["ja_train"] + docs["ja_valid"] == 397 and docs["en_train"] + docs["en_valid"] == 540
    tok = state["steps"]["tokenize"]["result"]["datasets"]
    assert {k: v["documents"] for k, v in tok.items()} == docs


def test_cpt_lowers_japanese_loss_and_the_export_reproduces_it(quickstart):
    out, _ = quickstart
    s = json.loads((out / "quickstart.json").read_text())["summary"]
    before, after = s["validation_loss"]["before"], s["validation_loss"]["after"]
    assert after["ja"] < before["ja"] - 0.3  # a base trained on English only: Japanese loss falls fast
    assert s["max_logit_diff"] <= 1e-5
    # the exported model is a plain transformers checkpoint that gives the run's final Japanese loss
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "models/cpt").eval()
    assert model.config.model_type == "llama"
    ds = IndexedDataset(str(out / "tokenized/ja_valid_text_document"))
    ids = torch.from_numpy(ds[0][:128].astype("int64"))[None]
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    assert abs(loss - after["ja"]) < 1.0  # same model, one document vs the validation sample
    # and the generation came from it, in the summary
    gen = s["generation"]
    assert gen["prompt"] and gen["continuations"]["cpt"] and gen["continuations"]["base"]


def test_rerun_reuses_finished_steps_and_redoes_what_changed(quickstart):
    out, _ = quickstart
    before = json.loads((out / "quickstart.json").read_text())["steps"]
    again = keizoku("quickstart", "--out", out, *FEW)
    assert again.stdout.count("reused") == 4  # split, base, cpt, export (tokenize and generate check themselves)
    after = json.loads((out / "quickstart.json").read_text())["steps"]
    assert after["cpt"]["finished"] == before["cpt"]["finished"]
    # more CPT steps: the base is reused, CPT and everything after it are redone
    longer = keizoku("quickstart", "--out", out, "--steps", "10", "--base-steps", "4")
    assert longer.stdout.count("reused") == 2  # split, base
    state = json.loads((out / "quickstart.json").read_text())
    assert state["steps"]["base"]["finished"] == before["base"]["finished"]
    assert state["summary"]["cpt_tokens"] == 10 * 8 * 256
    metrics = [json.loads(x) for x in (out / "runs/cpt/metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in metrics) == 10  # a fresh run, not one resumed past its old schedule


def test_refuses_a_directory_it_did_not_make(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    proc = keizoku("quickstart", "--out", tmp_path, *FEW, check=False)
    assert proc.returncode == 1
    assert "not a quickstart directory" in proc.stderr
    assert (tmp_path / "mine.txt").read_text() == "keep me"
