"""`keizoku eval` (lm-evaluation-harness) and eval.downstream, offline: a tiny Llama, a task of our own over a local
JSONL file (lm-eval's `dataset_path: json`), a run directory holding a real engine-torch checkpoint
(test_export.checkpointed_run). The scores must be lm-eval's own (`simple_evaluate` on the exported model), saved in
the run (results.json, the `downstream` record of metrics.jsonl); `after_checkpoint` must start a real detached
process that writes them; on a real Slurm (.ci/start-slurm.sh), as an eval job."""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import pytest

from launch_support import need, wait_until

from keizoku import downstream
from keizoku.config import load_config
from keizoku.rundir import read_jsonl

pytest.importorskip("lm_eval", reason="lm-eval is not installed: pip install 'keizoku[eval]'")

TASK = "keizoku_tiny_arith"
STEP = 5  # test_export.checkpointed_run's checkpoint


def tiny_task(directory: Path) -> Path:
    """A multiple-choice task over a local JSONL file: which of three numbers a sum is."""
    directory.mkdir(parents=True, exist_ok=True)
    rows = [{"question": f"{a} + {b} =", "choices": [str(a + b), str(a + b + 1), str(a * b + 7)],
             "label": (a + b) % 3} for a in range(1, 7) for b in range(1, 5)]
    for row in rows:  # the right answer at the label's place
        right = row["choices"].pop(0)
        row["choices"].insert(row["label"], right)
    (directory / "arith.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (directory / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {directory / 'arith.jsonl'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        "doc_to_target: label\n"
        "doc_to_choice: choices\n"
        "metric_list:\n"
        "  - {metric: acc, aggregation: mean, higher_is_better: true}\n"
        "  - {metric: acc_norm, aggregation: mean, higher_is_better: true}\n"
        "metadata:\n  version: 1.0\n")
    return directory


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    return tiny_task(tmp_path_factory.mktemp("tasks"))


def make_run(base: Path) -> Path:
    from test_export import checkpointed_run, tiny_model

    return checkpointed_run(base, tiny_model("llama"))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("eval-run"))


def cli(*args, cwd: Path | None = None):
    """`keizoku eval ...` in this process (lm-eval imported once for all the tests): (exit code, stdout, stderr)."""
    from typer.testing import CliRunner

    from keizoku.cli import app

    old = os.getcwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        result = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})
    finally:
        os.chdir(old)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def lm_eval_scores(model_dir: Path, tasks: Path) -> dict:
    """What lm-eval itself gives for the model (keizoku eval's defaults: batch size 8, the task's few-shot)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(tasks), include_defaults=False)
    results = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": str(model_dir)}, tasks=[TASK],
                                      batch_size=8, device="cpu", task_manager=tm, log_samples=False)
    return results["results"][TASK]


def downstream_records(run_dir: Path) -> list[dict]:
    return [r for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("kind") == "downstream"]


# --- keizoku eval -----------------------------------------------------------------------------------------------

def test_a_run_checkpoint_is_exported_evaluated_and_logged(run, tasks):
    """The run's newest checkpoint is exported into RUN/eval/step_N/hf (kept, and reused by the next eval of that
    step); lm-eval's full results land in results.json, the scores in metrics.jsonl as a downstream record: the
    numbers lm-eval's own simple_evaluate gives on the exported model."""
    code, out, err = cli("eval", run, "--tasks", TASK, "--include-path", tasks)
    assert code == 0, out + err
    step_dir = run / "eval" / f"step_{STEP:08d}"
    assert (step_dir / "hf" / "keizoku_export.json").is_file() and "exporting checkpoint step 5" in err
    results = json.loads((step_dir / "results.json").read_text())
    assert results["keizoku"]["step"] == STEP and results["keizoku"]["tasks"] == [TASK]
    [rec] = downstream_records(run)
    assert set(rec) == {"kind", "step", f"{TASK}/acc", f"{TASK}/acc_norm"} and rec["step"] == STEP

    reference = lm_eval_scores(step_dir / "hf", tasks)
    assert rec[f"{TASK}/acc"] == reference["acc,none"] and rec[f"{TASK}/acc_norm"] == reference["acc_norm,none"]
    assert results["results"][TASK]["acc,none"] == reference["acc,none"]
    assert reference["sample_len"] == 24
    assert TASK in out and f"{reference['acc,none']:.4f}" in out and str(step_dir / "results.json") in out

    code, out, err = cli("eval", run, "--step", STEP, "--tasks", TASK, "--include-path", tasks, "--remove-export")
    assert code == 0, out + err
    assert "reusing the export of checkpoint step 5" in err and not (step_dir / "hf").exists()
    assert [r[f"{TASK}/acc"] for r in downstream_records(run)] == [reference["acc,none"]] * 2


def test_a_hugging_face_directory_is_evaluated_as_it_is(run, tasks, tmp_path):
    """An HF model directory: results in ./keizoku-eval/NAME by default, or --out; nothing written beside the model,
    no metrics.jsonl."""
    model = run.parent / "model"
    before = sorted(p.name for p in model.iterdir())
    code, out, err = cli("eval", model, "--tasks", TASK, "--include-path", tasks, cwd=tmp_path)
    assert code == 0, out + err
    results = json.loads((tmp_path / "keizoku-eval" / "model" / "results.json").read_text())
    reference = lm_eval_scores(model, tasks)
    assert results["results"][TASK]["acc,none"] == reference["acc,none"]
    assert results["keizoku"]["scores"] == {f"{TASK}/acc": reference["acc,none"],
                                            f"{TASK}/acc_norm": reference["acc_norm,none"]}
    assert sorted(p.name for p in model.iterdir()) == before and not list(tmp_path.rglob("metrics.jsonl"))

    code, out, err = cli("eval", model, "--tasks", "keizoku_tiny_ar*", "--include-path", tasks, "--out",
                         tmp_path / "mine", "--limit", "5", "--num-fewshot", "1")  # lm-eval's globs too
    assert code == 0, out + err
    results = json.loads((tmp_path / "mine" / "results.json").read_text())
    assert results["results"][TASK]["sample_len"] == 5 and results["n-shot"][TASK] == 1


def test_unknown_tasks_and_paths_are_one_line_errors(run, tasks, tmp_path):
    code, out, err = cli("eval", run.parent / "model", "--tasks", f"{TASK},keizoku_tiny_arth,no_such_task_at_all",
                         "--include-path", tasks)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "'keizoku_tiny_arth' (did you mean keizoku_tiny_arith?), 'no_such_task_at_all'" in lines[0]
    assert "--include-path" in lines[0] and f"'{TASK}'" not in lines[0]

    code, _, err = cli("eval", tmp_path / "nowhere", "--tasks", "en")
    assert code == 2 and f"error: {tmp_path / 'nowhere'}: no such directory" in err
    code, _, err = cli("eval", tmp_path, "--tasks", "en")
    assert code == 2 and "neither a keizoku run directory (no config.yaml) nor a Hugging Face model" in err
    code, _, err = cli("eval", run, "--step", "7", "--tasks", TASK)
    assert code == 1 and "no complete checkpoint for step 7" in err and "step 5" in err
    code, _, err = cli("eval", run.parent / "model", "--step", "7", "--tasks", TASK)
    assert code == 2 and "--step 7" in err
    code, _, err = cli("eval", run, "--tasks", TASK, "--include-path", tmp_path / "none")
    assert code == 2 and "--include-path" in err and "no such directory" in err


def test_a_checkpoint_pruned_before_or_while_it_is_exported_is_said_so(tasks, tmp_path, monkeypatch):
    """Training prunes old checkpoints while an eval may be reading one: one line saying what happened, nothing
    half-written in RUN/eval."""
    import shutil

    from keizoku.engines.torch import export as torch_export
    from keizoku.rundir import discard

    run = make_run(tmp_path)
    shutil.copytree(run / "checkpoints" / "step_00000005", run / "checkpoints" / "step_00000010")  # a newer one
    write_weights = torch_export.write_weights

    def pruned_meanwhile(plan, out, verify):
        discard(run / "checkpoints" / "step_00000005")
        return write_weights(plan, out, verify)

    monkeypatch.setattr(torch_export, "write_weights", pruned_meanwhile)
    code, _, err = cli("eval", run, "--step", STEP, "--tasks", TASK, "--include-path", tasks)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, err
    assert "checkpoint step 5 was removed while it was being exported; nothing was evaluated" in lines[0]
    assert "one it has pruned is gone for good; evaluate one that is there — step 10 —" in lines[0]
    assert [p.name for p in (run / "eval" / "step_00000005").iterdir()] == [".lock"]

    code, _, err = cli("eval", run, "--step", STEP, "--tasks", TASK, "--include-path", tasks)
    assert code == 1 and "no complete checkpoint for step 5" in err and "checkpoint.keep_last" in err, err


def test_presets_expand_to_lm_eval_tasks():
    """ja and en expand in place, mixed with names; every name a preset gives is one lm-eval ships (a task, group or
    tag of its YAML files)."""
    assert downstream.expand_tasks(["ja,mmlu", "my_task", "en", "hellaswag"]) == [
        *downstream.PRESETS["ja"], "mmlu", "my_task",
        *[t for t in downstream.PRESETS["en"] if t != "mmlu"]]
    assert downstream.PRESETS["ja"] == ["ja_leaderboard_jcommonsenseqa", "ja_leaderboard_jnli",
                                        "ja_leaderboard_marc_ja", "ja_leaderboard_jsquad", "ja_leaderboard_xwinograd",
                                        "ja_leaderboard_mgsm", "ja_leaderboard_xlsum"]
    import lm_eval

    shipped = set()
    for path in Path(lm_eval.__file__).parent.joinpath("tasks").rglob("*.yaml"):
        text = path.read_text(errors="replace")
        shipped.update(re.findall(r"^(?:task|group|tag):\s*([\w.-]+)\s*$", text, flags=re.M))
    missing = [t for preset in downstream.PRESETS.values() for t in preset if t not in shipped]
    assert not missing, f"lm-eval {downstream._lm_eval_version()} ships no task {missing}"


def test_the_record_names_each_metric_and_its_filter(tmp_path, monkeypatch):
    results = {"results": {
        "gsm8k": {"alias": "gsm8k", "exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": 0.01,
                  "exact_match,flexible-extract": 0.5, "exact_match_stderr,flexible-extract": "N/A"},
        "mmlu": {"alias": "mmlu", "acc,none": 0.3, "acc_stderr,none": 0.02, "sample_len": 100},
        "jnli": {"balanced-acc,none": 0.4, "acc,none": float("nan")}}}
    assert downstream.record(9, downstream.record_values(results)) == {
        "kind": "downstream", "step": 9, "gsm8k/exact_match_strict-match": 0.25,
        "gsm8k/exact_match_flexible-extract": 0.5, "mmlu/acc": 0.3, "jnli/balanced-acc": 0.4}

    import types

    written = []

    class Writer:
        def __init__(self, logdir):
            written.append(("dir", logdir))

        def add_scalar(self, tag, value, step):
            written.append((tag, value, step))

        def close(self):
            written.append("closed")

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    downstream._tensorboard(downstream.RunDir(tmp_path), 9, {"mmlu/acc": 0.3}, print)
    assert written == [("dir", str(tmp_path / "tensorboard")), ("downstream/mmlu/acc", 0.3, 9), "closed"]


# --- eval.downstream while training ----------------------------------------------------------------------------

def downstream_config(run_dir: Path, tasks: Path, *overrides: str):
    return load_config(run_dir / "config.yaml", [f"eval.downstream.tasks=[{TASK}]",
                                                 f"eval.downstream.include_path={tasks}", *overrides])


def test_which_checkpoints_are_due(run, tasks):
    cfg = downstream_config(run, tasks, "checkpoint.interval=2", "eval.downstream.every=2", "train.max_steps=9")
    assert [s for s in range(1, 10) if downstream.is_due(cfg, s)] == [4, 8, 9]
    cfg = downstream_config(run, tasks, "checkpoint.interval=0", "train.max_steps=9")
    assert [s for s in range(1, 10) if downstream.is_due(cfg, s)] == [9]
    for off in ("eval.downstream.every=0", "eval.downstream.tasks=[]"):
        assert not downstream.is_due(downstream_config(run, tasks, off, "checkpoint.interval=1"), 1)


def test_the_settings_are_checked():
    from keizoku.config import ConfigError

    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.hf_path=m", "data.mock=true", "train.max_steps=3", "eval.downstream.every=-1",
                           "eval.downstream.tasks=[ja, '']", "eval.downstream.device=gpu",
                           "eval.downstream.batch_size=0", "eval.downstream.profile_set=[walltime]"])
    assert [line.split(":")[0] for line in str(e.value).splitlines()] == [
        "eval.downstream.tasks", "eval.downstream.every", "eval.downstream.batch_size", "eval.downstream.device",
        "eval.downstream.profile_set"]


def test_submit_eval_writes_a_one_node_job_of_keizoku_eval(run, tasks, tmp_path):
    """keizoku submit eval --dry-run: a Grid Engine script with the profile's directives for one node, no walltime
    warning, exec of keizoku eval with the arguments given; bad eval arguments are refused (exit 2)."""
    code, out, err = cli("submit-eval", "--profile", "tsubame4", "--set", "group=tga1", "--dry-run", "--", run,
                         "--step", STEP, "--tasks", "ja", cwd=tmp_path)
    assert code == 0, out + err
    assert f"# {run.absolute()}/submit/" in out and f".eval-step_{STEP:08d}.sh (dry run: not written)" in out
    assert "#$ -N keizoku-eval-run-5\n" in out and "#$ -l node_f=1\n" in out and "-notify" not in out
    assert f"-m keizoku eval {run} --step 5 --tasks ja\n" in out and "#   qsub -terse -g tga1 " in out
    assert not (run / "submit").exists()
    code, _, err = cli("submit-eval", "--profile", "tsubame4", "--set", "group=tga1", "--", run, "--tasks", "ja",
                       "--step", "7")
    assert code == 2 and "no complete checkpoint for step 7" in err
    code, _, err = cli("submit-eval", "--profile", "tsubame4", "--set", "group=tga1", "--", run, "--nope")
    assert code == 2 and "No such option: --nope" in err and "Usage: keizoku eval" in err


def test_after_checkpoint_starts_a_detached_eval_that_logs_the_scores(tasks, tmp_path, monkeypatch, capsys):
    """A due checkpoint: after_checkpoint returns at once, having started `keizoku eval` in its own session, on the
    CPU with no GPU visible and no rank variables, its output in RUN/logs; the results and the record come."""
    run = make_run(tmp_path)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    cfg = downstream_config(run, tasks, "eval.downstream.limit=10")
    downstream.after_checkpoint(cfg, run, STEP - 1)  # not due: nothing happens
    assert not (run / "logs").exists()

    start = time.monotonic()
    downstream.after_checkpoint(cfg, run, STEP)
    assert time.monotonic() - start < 2
    said = capsys.readouterr().err
    pid = int(re.search(r"\(pid (\d+);", said).group(1))
    assert f"evaluating checkpoint step {STEP} on cpu in the background" in said
    try:
        assert os.getsid(pid) == pid != os.getsid(0)
        env = dict(item.split("=", 1) for item in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in item)
        assert env["CUDA_VISIBLE_DEVICES"] == "" and "RANK" not in env and "MASTER_PORT" not in env
    except (ProcessLookupError, FileNotFoundError):
        pass  # it has finished already
    log = run / "logs" / f"eval-step_{STEP:08d}.log"
    results = run / "eval" / f"step_{STEP:08d}" / "results.json"
    wait_until(lambda: downstream_records(run), 120, "the eval's downstream record",
               on_timeout=lambda: log.read_text())
    rec = downstream_records(run)[0]
    assert rec["step"] == STEP and json.loads(results.read_text())["results"][TASK]["acc,none"] == rec[f"{TASK}/acc"]
    assert json.loads(results.read_text())["results"][TASK]["sample_len"] == 10
    wait_until(lambda: not (run / "eval" / f"step_{STEP:08d}" / "hf").exists(), 30, "the export's removal")
    assert "keizoku eval" in log.read_text().splitlines()[0] and "--remove-export" in log.read_text()


def test_under_a_scheduler_without_a_profile_nothing_is_started(run, tasks, monkeypatch, capsys):
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "node1")
    downstream.after_checkpoint(downstream_config(run, tasks), run, STEP)
    said = capsys.readouterr().err
    assert "checkpoint step 5 is not evaluated: this run is a slurm job" in said
    assert "keizoku submit eval --profile NAME -- " in said and not (run / "logs").exists()


def test_a_slurm_job_evaluates_a_due_checkpoint(tasks, tmp_path, monkeypatch, capsys):
    """In a Slurm job (its variables), after_checkpoint submits an eval job through `keizoku submit eval` with
    eval.downstream.profile: the real sbatch, the job's script and record in the run, and its scores."""
    need("sbatch", "squeue", why="Slurm")
    run = make_run(tmp_path)
    profile = tmp_path / "eval-profile.yaml"
    profile.write_text("base: slurm\ngpus_per_node: 0\ndirectives: []\nwalltime: '00:05:00'\n")
    monkeypatch.setenv("SLURM_JOB_ID", "1")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "node1")
    cfg = downstream_config(run, tasks, f"eval.downstream.profile={profile}", "eval.downstream.limit=6",
                            "eval.downstream.profile_set=[name=x]")
    assert any("eval.downstream.profile: " in p for p in downstream.problems(cfg))  # name= is no profile setting
    cfg = downstream_config(run, tasks, f"eval.downstream.profile={profile}", "eval.downstream.limit=6")
    assert downstream.problems(cfg) == []
    downstream.after_checkpoint(cfg, run, STEP)
    assert "submitting the eval job of checkpoint step 5 (slurm)" in capsys.readouterr().err
    log = run / "logs" / f"eval-step_{STEP:08d}.log"
    jobs = run / "eval" / "jobs.jsonl"
    wait_until(lambda: jobs.exists() and read_jsonl(jobs), 120, "the eval job's record", on_timeout=log.read_text)
    [job] = read_jsonl(jobs)
    assert job["kind"] == "eval" and job["step"] == STEP and job["scheduler"] == "slurm"
    assert f"submitted job {job['job_id']}" in log.read_text()
    script = Path(job["script"]).read_text()
    assert "#SBATCH --nodes=1" in script and f"-m keizoku eval {run.absolute()} --step 5" in script
    wait_until(lambda: downstream_records(run), 180, "the eval job's downstream record",
               on_timeout=lambda: Path(job["log"]).read_text() if Path(job["log"]).exists() else "(no job log)")
    rec = downstream_records(run)[0]
    assert rec["step"] == STEP and f"{TASK}/acc" in rec
    assert (run / "eval" / f"step_{STEP:08d}" / "results.json").is_file()
