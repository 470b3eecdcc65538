"""`keizoku report` (keizoku.report): two run directories written by hand (train, eval and downstream records, phases
from schedule.json in one and from the records' "phase" in the other, a line cut short by a crash), reported through
the real CLI and opened in a real headless Chromium, which must load and show every plot. No training: fast.

Chromium: Debian's chromium and chromium-driver (.ci/run installs them), driven by Selenium. Without them the
browser test is skipped, or fails under KEIZOKU_REQUIRE_BROWSER=1 (what .ci/run sets)."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

import pytest

from conftest import keizoku
from keizoku.report import (Boundary, TokenAxis, boundaries_from_records, boundaries_from_schedule, build_plots,
                            loss_figure, read_metrics, read_run, read_runs, write_loss_png)

REQUIRE_BROWSER = os.environ.get("KEIZOKU_REQUIRE_BROWSER") == "1"
PNG = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------------------------
# two runs, written as keizoku writes them


def _train_record(step: int, per_step: int, phase: str | None, lr: float, extra: dict | None = None) -> dict:
    loss = 2.0 + 1.5 * math.exp(-step / 25) + 0.02 * math.sin(step)
    record = {"kind": "train", "step": step, "loss": round(loss, 6), "lr": lr, "grad_norm": 0.8 + 0.3 / step,
              "tokens_per_s": 41000.0 + 10 * step, "tokens_per_s_per_device": (41000.0 + 10 * step) / 8,
              "step_s": per_step / (41000.0 + 10 * step), "data_share": 0.01, "tokens": step * per_step}
    if phase:
        record["phase"] = phase
    return record | (extra or {})


def _lr(step: int, first_anneal: int, last: int) -> float:
    """Warmup 5 steps to 3e-4, constant, then linear down to 3e-5 from first_anneal to last."""
    if step <= 5:
        return 3e-4 * step / 5
    if step < first_anneal:
        return 3e-4
    return 3e-4 + (3e-5 - 3e-4) * (step - first_anneal + 1) / (last - first_anneal + 1)


def write_run(path: Path, *, phases: list[tuple[str, int]], per_step: int, schedule: bool, phase_in_records: bool,
              extra: dict | None = None, downstream: bool = True, cut_short: bool = False) -> list[dict]:
    """A run directory of ``phases`` (name, steps) logged every 5 steps, validated on ja and en at step 0, every 20
    steps and at each phase's end; downstream scores every 20 steps. Returns its records."""
    path.mkdir(parents=True)
    total = sum(n for _, n in phases)
    starts, first = [], 0
    for name, n in phases:
        starts.append((name, first + 1, first + n))
        first += n

    def phase_of(step: int) -> str:
        return next(name for name, a, b in starts if a <= max(step, 1) <= b)

    anneal = starts[-1][1]
    records = []
    phase_ends = {b for _, _, b in starts}
    for step in range(total + 1):
        ph = phase_of(step) if phase_in_records else None
        if step and (step % 5 == 0 or step == total):
            records.append(_train_record(step, per_step, ph, _lr(step, anneal, total), extra))
        if step % 20 == 0 or step in phase_ends:
            rec = {"kind": "eval", "step": step}
            for s, base in (("ja", 3.2), ("en", 2.4)):
                loss = round(base - 0.4 * step / total + (0.1 if s == "en" else 0.0) * step / total, 6)
                rec |= {f"{s}_loss": loss, f"{s}_ppl": math.exp(loss)}
            records.append(rec | ({"phase": ph} if ph else {}))
        if downstream and step and step % 20 == 0:
            records.append({"kind": "downstream", "step": step, "jcommonsenseqa/acc": 0.3 + step / 1000,
                            "mmlu/acc": 0.45 - step / 5000})
    lines = [json.dumps(r) for r in records]
    text = "\n".join(lines) + "\n"
    if cut_short:
        text += lines[-1][: len(lines[-1]) // 2]  # a kill mid-write: no newline, half a record
    (path / "metrics.jsonl").write_text(text)
    seq = 1024
    config = {"engine": "torch", "run_dir": str(path), "model": {"hf_path": f"meta-llama/{path.name}-base"},
              "data": {"seq_length": seq}, "train": {"global_batch_size": per_step // seq, "max_steps": total}}
    if len(phases) > 1:
        config["phases"] = [{"name": name, "max_steps": n} for name, n in phases]
    import yaml

    (path / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 7230))  # two hours ago
    (path / "config-history.jsonl").write_text(json.dumps({"time": started, "argv": ["train"], "changes": {},
                                                           "allowed": False, "first": True}) + "\n")
    if schedule:
        plan = {"segments": [{"name": name, "kind": "phase", "first_step": a, "last_step": b,
                              "first_tokens": (a - 1) * per_step, "last_tokens": b * per_step}
                             for name, a, b in starts],
                "lr": [[k, _lr(k, anneal, total)] for k in range(1, total + 1)]}
        (path / "schedule.json").write_text(json.dumps(plan))
    return records


RUN_A = dict(phases=[("main", 40), ("anneal", 20)], per_step=8 * 1024, schedule=True, phase_in_records=True,
             cut_short=True)
RUN_B = dict(phases=[("stable", 30), ("decay", 20)], per_step=16 * 1024, schedule=False, phase_in_records=True,
             extra={"mfu": 0.41, "memory_gib": 61.5, "router_aux_loss": 0.012})


@pytest.fixture
def two_runs(tmp_path):
    a, b = tmp_path / "runs" / "cpt-a", tmp_path / "runs" / "cpt-b"
    return (a, write_run(a, **RUN_A)), (b, write_run(b, **RUN_B))


# ---------------------------------------------------------------------------------------------------------------
# the browser


def _browser():
    """A headless Chromium under Selenium, or a skip (a failure under KEIZOKU_REQUIRE_BROWSER=1) saying what is
    missing."""
    binary = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    driver = shutil.which("chromedriver")
    missing = [what for what, found in (("chromium", binary), ("chromedriver", driver)) if not found]
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing.append("the selenium package (pip install -e '.[dev]')")
    if missing:
        reason = (f"no headless browser: {', '.join(missing)} missing (apt-get install chromium chromium-driver; "
                  ".ci/run installs them)")
        if REQUIRE_BROWSER:
            pytest.fail(f"KEIZOKU_REQUIRE_BROWSER=1 but {reason}")
        pytest.skip(reason)
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1600", "--allow-file-access-from-files"):
        options.add_argument(arg)
    # the system's chromedriver: Selenium Manager would try to download one
    return webdriver.Chrome(service=Service(driver), options=options)


@pytest.fixture(scope="module")
def browser():
    driver = _browser()
    yield driver
    driver.quit()


# each image's state as the browser has it: loaded, decoded size, laid-out size, and the share of its pixels that
# are not background (a plot, not a blank or broken image)
IMAGES_JS = """
return Array.from(document.images).map(img => {
  let ink = -1;
  try {
    const c = document.createElement('canvas');
    c.width = img.naturalWidth; c.height = img.naturalHeight;
    const g = c.getContext('2d'); g.drawImage(img, 0, 0);
    const d = g.getImageData(0, 0, c.width, c.height).data;
    let n = 0;
    for (let i = 0; i < d.length; i += 4) if (d[i] < 200 || d[i + 1] < 200 || d[i + 2] < 200) n++;
    ink = n / (d.length / 4);
  } catch (e) { ink = -2; }
  const r = img.getBoundingClientRect();
  return {alt: img.alt, complete: img.complete, naturalWidth: img.naturalWidth, naturalHeight: img.naturalHeight,
          width: r.width, height: r.height, src: img.src.slice(0, 21), ink: ink,
          title: img.closest('figure').querySelector('h3').textContent,
          caption: img.closest('figure').querySelector('figcaption').textContent};
});
"""


def test_the_page_renders_every_plot_in_a_real_browser(two_runs, tmp_path, browser):
    (a, records_a), (b, records_b) = two_runs
    start = time.perf_counter()
    proc = keizoku("report", a, b, "--label", "baseline", "--label", "two-phase")
    page = a / "report.html"
    assert proc.stdout.strip() == str(page), proc.stdout  # its path printed
    assert time.perf_counter() - start < 60
    assert not list(a.glob(".tmp*"))  # published by rename, nothing left behind

    browser.get(page.absolute().as_uri())
    images = browser.execute_script(IMAGES_JS)
    titles = [i["title"] for i in images]
    for title in ("Train and validation loss", "Train loss", "Validation loss: ja", "Validation loss: en",
                  "Learning rate", "Throughput", "Throughput per device", "MFU", "Gradient norm",
                  "Router load-balancing loss", "Peak memory", "Downstream: jcommonsenseqa/acc",
                  "Downstream: mmlu/acc"):
        assert title in titles, (title, titles)
    for img in images:
        assert img["complete"] and img["naturalWidth"] > 400 and img["naturalHeight"] > 200, img
        assert img["width"] > 300 and img["height"] > 150, img  # laid out at a readable size
        assert img["src"] == "data:image/png;base64", img  # self-contained
        assert 0.02 < img["ink"] < 0.6, img  # drawn on: axes, lines, text; not blank
        assert img["alt"] == img["title"]
    # nothing fetched from elsewhere
    assert browser.execute_script("return document.querySelectorAll('script[src], link[href], iframe').length") == 0

    text = browser.find_element("tag name", "body").text
    assert "baseline" in text and "two-phase" in text
    for phase in ("main", "anneal", "stable", "decay"):
        assert phase in text, phase
    # every plot over the run says which phase boundaries it draws: both runs' phases
    loss_caption = next(i["caption"] for i in images if i["title"] == "Train and validation loss")
    assert all(p in loss_caption for p in ("main", "anneal", "stable", "decay")), loss_caption
    lr_caption = next(i["caption"] for i in images if i["title"] == "Learning rate")
    assert "planned" in lr_caption

    # the table shows the data's numbers: the last train record (the half line at the end is skipped)
    rows = {r.get_attribute("data-run"): r for r in browser.find_elements("css selector", "tr.run")}
    assert set(rows) == {"baseline", "two-phase"}
    for label, records, path in (("baseline", records_a, a), ("two-phase", records_b, b)):
        cells = {c.get_attribute("data-col"): c for c in rows[label].find_elements("tag name", "td")}
        last_train = [r for r in records if r["kind"] == "train"][-1]
        last_eval = [r for r in records if r["kind"] == "eval"][-1]
        assert float(cells["last train loss"].get_attribute("data-value")) == last_train["loss"]
        assert cells["last train loss"].text.startswith(f"{last_train['loss']:.4f}")
        assert json.loads(cells["last eval losses"].get_attribute("data-value")) == \
            {"ja": last_eval["ja_loss"], "en": last_eval["en_loss"]}
        assert cells["tokens"].text.startswith(f"{last_train['tokens']:,}")
        assert cells["steps"].text == f"{last_train['step']} of {last_train['step']}"
        assert cells["model"].text == f"meta-llama/{path.name}-base"
        assert cells["engine"].text == "torch"
        assert cells["run directory"].text == str(path)
        assert cells["wall time"].text.endswith("; 2h 00m since the first start (1 start)"), cells["wall time"].text
        step_s = sum(r["step_s"] * 5 for r in records if r["kind"] == "train")  # logged every 5 steps
        assert cells["wall time"].text.startswith(f"{round(step_s)}s in steps")
    assert rows["baseline"].find_element("css selector", '[data-col="phases"]').text == \
        "main: steps 1–40; anneal: steps 41–60 [schedule.json]"
    assert rows["two-phase"].find_element("css selector", '[data-col="phases"]').text == \
        "stable: steps 1–30; decay: steps 31–50 [metrics.jsonl]"
    assert "1 unreadable line of metrics.jsonl skipped" in text


def test_one_run_without_downstream_says_so_and_out_overrides(tmp_path, browser):
    run = tmp_path / "solo"
    write_run(run, phases=[("run", 30)], per_step=4096, schedule=False, phase_in_records=False, downstream=False)
    out = tmp_path / "elsewhere" / "page.html"
    proc = keizoku("report", run, "-o", out, "--x", "steps")
    assert proc.stdout.strip() == str(out) and out.is_file() and not (run / "report.html").exists()
    browser.get(out.absolute().as_uri())
    images = browser.execute_script(IMAGES_JS)
    titles = {i["title"] for i in images}
    assert "Train and validation loss" in titles and not any(t.startswith("Downstream") for t in titles)
    assert "MFU" not in titles and "Train loss" not in titles  # no mfu recorded; one run: the combined plot only
    assert all(i["complete"] and i["naturalWidth"] > 400 for i in images)
    text = browser.find_element("tag name", "body").text
    assert "no downstream evaluations yet" in text
    assert browser.find_element("css selector", '[data-col="phases"]').text == "—"


# ---------------------------------------------------------------------------------------------------------------
# reading


def test_boundaries_from_schedule_json(tmp_path):
    schedule = {"segments": [{"name": "main", "kind": "phase", "first_step": 1, "last_step": 40, "first_tokens": 0},
                             {"name": "anneal", "kind": "phase", "first_step": 41, "last_step": 60,
                              "first_tokens": 40 * 8192},
                             {"name": "extension-1", "kind": "extension", "first_step": 61, "last_step": 80}],
                "lr": [[1, 1e-4], [80, 1e-5]]}
    axis = TokenAxis([], tokens_per_step=8192)
    assert boundaries_from_schedule(schedule, axis) == [
        Boundary("main", 0, 0.0, "phase", 40), Boundary("anneal", 40, 40 * 8192.0, "phase", 60),
        Boundary("extension-1", 60, 60 * 8192.0, "extension", 80)]  # first_tokens absent: step × tokens per step
    # a plain run's one segment is no boundary
    assert boundaries_from_schedule({"segments": [{"name": "run", "kind": "run", "first_step": 1,
                                                   "last_step": 9}]}, axis) == []
    # in a run directory, schedule.json wins over the records
    run = tmp_path / "r"
    write_run(run, **RUN_A)
    (run / "schedule.json").write_text(json.dumps(schedule))
    r = read_run(run)
    assert [b.name for b in r.boundaries] == ["main", "anneal", "extension-1"] and r.boundary_source == "schedule.json"
    assert r.planned_steps() == 80 and r.planned_lr() == [(1, 1e-4), (80, 1e-5)]


def test_boundaries_from_records(tmp_path):
    per_step = 1000
    records = [{"kind": "eval", "step": 0, "phase": "main"}]
    records += [{"kind": "train", "step": s, "tokens": s * per_step, "phase": "main"} for s in (5, 10)]
    records += [{"kind": "eval", "step": 12, "phase": "main"}]  # the phase's end, evaluated
    records += [{"kind": "train", "step": s, "tokens": s * per_step, "phase": "anneal"} for s in (15, 20)]
    records += [{"kind": "downstream", "step": 20, "x/acc": 0.5}]
    axis = TokenAxis([r for r in records if r["kind"] == "train"])
    assert boundaries_from_records(records, axis) == [Boundary("main", 0, 0.0), Boundary("anneal", 12, 12000.0)]
    # a run extended later: records without a phase, then the extension's
    extended = [{"kind": "train", "step": s, "tokens": s * per_step} for s in (5, 10)]
    extended += [{"kind": "train", "step": 15, "tokens": 15000, "phase": "extension-1"}]
    assert boundaries_from_records(extended, TokenAxis(extended)) == [Boundary("extension-1", 10, 10000.0)]
    assert boundaries_from_records(extended[:2], TokenAxis(extended)) == []  # no phases: none
    # in a run directory without schedule.json
    run = tmp_path / "r"
    write_run(run, **RUN_B)
    r = read_run(run)
    assert r.boundary_source == "metrics.jsonl"
    assert [(b.name, b.step, b.tokens) for b in r.boundaries] == [("stable", 0, 0.0), ("decay", 30, 30 * 16384.0)]
    assert r.planned_steps() == 50 and r.planned_lr() == []


def test_a_line_cut_short_is_skipped_and_counted(tmp_path):
    path = tmp_path / "metrics.jsonl"
    good = [{"kind": "train", "step": 1, "loss": 3.0, "tokens": 10}, {"kind": "eval", "step": 1, "a_loss": 2.0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in good) + "\n[1, 2]\n" + '{"kind": "train", "step": 2, "lo')
    assert read_metrics(path) == (good, 2)  # the cut line, and a line that is no record
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(path, run / "metrics.jsonl")
    r = read_run(run)
    assert [t["step"] for t in r.train] == [1] and r.skipped == 2 and "2 unreadable lines" in r.notes[0]


def test_tokens_of_a_step():
    train = [{"step": 10, "tokens": 1000}, {"step": 20, "tokens": 3000}]  # the batch grew at a restart
    axis = TokenAxis(train, tokens_per_step=100)
    assert [axis(s) for s in (0, 5, 10, 15, 20, 25)] == [0, 500, 1000, 2000, 3000, 3500]
    assert TokenAxis([], 64)(3) == 192 and TokenAxis([], None)(3) is None and not TokenAxis([], None).usable
    assert TokenAxis(train)(30) == 4500  # past the last record, without a config: its average per step


def test_the_plots_hold_the_records_numbers(two_runs):
    (a, records_a), (b, records_b) = two_runs
    runs = read_runs([a, b], ["A"])
    assert [r.label for r in runs] == ["A", "cpt-b"]
    found = loss_figure(runs)
    lines = {line.get_gid(): line for line in found[0].axes[0].lines}
    train_a = [r for r in records_a if r["kind"] == "train"]
    assert list(lines["train:A"].get_xdata()) == [r["tokens"] for r in train_a]
    assert list(lines["train:A"].get_ydata()) == [r["loss"] for r in train_a]
    evals_b = [r for r in records_b if r["kind"] == "eval"]
    assert list(lines["eval:cpt-b:en"].get_xdata()) == [r["step"] * 16384 for r in evals_b]  # step → tokens
    assert list(lines["eval:cpt-b:en"].get_ydata()) == [r["en_loss"] for r in evals_b]
    phases = [t.get_text() for t in found[0].axes[0].texts]
    assert phases == ["main", "anneal", "stable", "decay"]
    assert [round(line.get_xdata()[0]) for line in found[0].axes[0].lines if line.get_linestyle() == ":"] == \
        [40 * 8192, 30 * 16384]  # the boundaries (none drawn at the start)
    plots, missing = build_plots(runs, "steps")
    assert {p.title for p in plots} >= {"Learning rate", "Downstream: mmlu/acc", "MFU"}
    assert missing == []


def test_errors_are_one_line(tmp_path):
    empty = tmp_path / "not-a-run"
    empty.mkdir()
    proc = keizoku("report", empty, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [(f"error: {empty}: no metrics.jsonl (not a keizoku run directory, or "
                                                 "a run that has not logged a step yet)")]
    proc = keizoku("report", tmp_path / "nowhere", check=False)
    assert proc.returncode == 1 and proc.stderr.strip() == f"error: {tmp_path / 'nowhere'}: no such run directory"
    run = tmp_path / "r"
    write_run(run, **RUN_B)
    proc = keizoku("report", run, "--label", "x", "--label", "y", check=False)
    assert proc.returncode == 2 and "--label: 2 given for 1 run directory" in proc.stderr
    assert not (run / "report.html").exists()


def test_the_quickstart_plot(tmp_path):
    """quickstart's loss.png is loss_figure over steps."""
    run = tmp_path / "cpt"
    write_run(run, phases=[("run", 20)], per_step=2048, schedule=False, phase_in_records=False, downstream=False)
    out = write_loss_png(run, tmp_path / "loss.png", "a title")
    assert out.read_bytes()[:8] == PNG
    from keizoku.quickstart import _Quickstart

    qs = _Quickstart.__new__(_Quickstart)  # its plot step alone, on this run (the whole quickstart is slow)
    qs.results = {"cpt": {"run_dir": str(run)}}
    assert qs.plot() == run / "loss.png" and (run / "loss.png").read_bytes()[:8] == PNG
