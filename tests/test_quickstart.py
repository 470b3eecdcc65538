"""`keizoku quickstart` end to end, with fewer steps than the default (same code path)."""

import json
import os
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import keizoku

ROOT = Path(__file__).resolve().parents[1]
FEW = ("--steps", "8", "--base-steps", "4")


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    out = tmp_path_factory.mktemp("qs") / "quickstart-out"  # the name the examples' paths use
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


def test_two_phase_example_end_to_end(quickstart, tmp_path):
    """examples/ja_cpt_two_phase.yaml on the quickstart's data, from the directory that holds quickstart-out/ (its
    phases shortened to 6 + 6 steps for the suite's time; same blends, warmup and decay): a kill -9 mid-anneal
    resumes to the uninterrupted run's weights bit for bit, `keizoku eval` (started by eval.downstream at each
    phase's end) scores the result on a local lm-eval task, and `keizoku report` of both runs renders its plots,
    the scores among them, in headless Chromium."""
    from test_downstream import TASK, tiny_task
    from test_report import IMAGES_JS, _browser
    from test_train import final_weights, metrics

    from keizoku.engines.torch.checkpoint import TEST_HOOK_ENV
    from keizoku.rundir import committed_checkpoints, kept_reason

    out, _ = quickstart
    work = out.parent
    example = ROOT / "examples/ja_cpt_two_phase.yaml"
    phases = yaml.safe_load(example.read_text())["phases"]
    assert [p["name"] for p in phases] == ["main", "anneal"] and phases[1]["decay"] == "linear"
    phases[0].update(max_steps=6, warmup_steps=2)
    phases[1].update(max_steps=6)
    short = [f"phases={json.dumps(phases)}", "checkpoint.interval=2", "eval.interval=0"]

    tasks = tiny_task(tmp_path / "tasks")
    # eval.downstream: every phase's end is evaluated by a detached `keizoku eval` while training goes on
    downstream = [f"eval.downstream.tasks=[{TASK}]", f"eval.downstream.include_path={tasks}",
                  "eval.downstream.every=100"]
    keizoku("train", example, "run_dir=runs/whole", *short, *downstream, cwd=work)
    killed = keizoku("train", example, "run_dir=runs/killed", *short, cwd=work, check=False,
                     env={**os.environ, TEST_HOOK_ENV: "10:staging:kill"})
    assert killed.returncode != 0
    resumed = keizoku("train", example, "run_dir=runs/killed", *short, cwd=work).stdout
    assert "resumed from runs/killed/checkpoints/step_00000008" in resumed  # mid-anneal (steps 7-12)
    whole, run = work / "runs/whole", work / "runs/killed"
    a, b = final_weights(whole, 12), final_weights(run, 12)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)
    assert [(r["step"], r["loss"], r["lr"], r["phase"]) for r in metrics(run, "train")] == \
        [(r["step"], r["loss"], r["lr"], r["phase"]) for r in metrics(whole, "train")]
    assert {c.step: kept_reason(c.path) for c in committed_checkpoints(run) if kept_reason(c.path)} == {
        6: "the end of phase main", 12: "the end of phase anneal"}

    # `keizoku eval` of the whole run's phase ends, started in the background by eval.downstream as each was saved
    deadline = time.monotonic() + 240
    while len(metrics(whole, "downstream")) < 2 and time.monotonic() < deadline:
        time.sleep(1)
    logs = "\n".join(p.read_text()[-2000:] for p in sorted((whole / "logs").glob("eval-*.log")))
    scores = metrics(whole, "downstream")
    assert sorted(r["step"] for r in scores) == [6, 12], logs
    final = next(r for r in scores if r["step"] == 12)
    assert 0 <= final[f"{TASK}/acc"] <= 1
    assert json.loads((whole / "eval/step_00000012/results.json").read_text())["results"][TASK]["acc,none"] == \
        final[f"{TASK}/acc"]

    page = Path(keizoku("report", whole, run, cwd=work).stdout.strip())
    assert page == whole / "report.html"
    browser = _browser()
    try:
        browser.get(page.absolute().as_uri())
        images = browser.execute_script(IMAGES_JS)
        text = browser.find_element("tag name", "body").text
    finally:
        browser.quit()
    titles = {i["title"] for i in images}
    assert {"Train and validation loss", "Learning rate", f"Downstream: {TASK}/acc"} <= titles, titles
    for img in images:
        assert img["complete"] and img["naturalWidth"] > 400 and 0.01 < img["ink"] < 0.6, img  # drawn on
    assert "main" in text and "anneal" in text
