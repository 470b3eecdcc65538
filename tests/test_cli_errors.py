"""First contact (issue 21.10, 21.17, 21.19): a broken config or override is one line naming the file's line and
key, or the override, with what to do; output that is no terminal is not cut at 80 columns; help shows no
``<bool>`` and a short flag means one thing in every command. Everything through the real CLI in a subprocess."""

from __future__ import annotations

import os
import re

import pytest

from conftest import SAMPLE_TOKENIZER, keizoku, write_jsonl

GOOD = "model:\n  hf_path: some/model\ndata:\n  mock: true\ntrain:\n  max_steps: 5\n"


def _env(**extra: str) -> dict[str, str]:
    """The environment of a log file or CI: no COLUMNS (unless given)."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    return env | extra


def _fails(tmp_path, *args, status: int) -> list[str]:
    """Run keizoku in ``tmp_path`` expecting ``status`` and no traceback; its stderr lines. Nothing else in
    ``tmp_path`` may change."""
    keep = tmp_path / "keep.txt"
    keep.write_text("the user's own file\n")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    proc = keizoku(*args, cwd=tmp_path, check=False, env=_env())
    assert proc.returncode == status, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before  # nothing written, no run dir
    return proc.stderr.splitlines()


BAD_YAML = {
    # name: (file text, the line keizoku prints)
    "syntax": ("model:\n  hf_path: a\ndata: {mock: true\ntrain:\n  max_steps: 5\n",
               "error: {f}:4:6: invalid YAML: expected ',' or '}}', but got ':' (while parsing a flow mapping at 3:7)"),
    "tab": ("model:\n\thf_path: a\n",
            "error: {f}:2:1: invalid YAML: found character '\\t' that cannot start any token"),
    "list": ("- model\n- data\n", ("error: {f}:1:1: the top level must be a mapping of sections (model:, data:, "
                                   "train:, ...), not a list; keizoku config defaults lists every setting")),
    "scalar": ("just some words\n", ("error: {f}:1:1: the top level must be a mapping of sections (model:, data:, "
                                     "train:, ...), not just some words; keizoku config defaults lists every setting")),
    "type": (GOOD.replace("mock: true", "mock: true\n  seq_length: long"),
             "error: {f}:5:3: data.seq_length: Value 'long' of type 'str' could not be converted to Integer"),
    "unknown": (GOOD + "  global_batch: 4\n", ("error: {f}:7:3: train.global_batch: not a setting; did you mean "
                                               "train.global_batch_size? (keizoku config defaults lists every setting)")),
    "section": (GOOD.replace("train:\n  max_steps: 5", "train: 5"),
                "error: {f}:5:1: train: must be a mapping ({{key: value, ...}}), not 5"),
    "empty section": (GOOD + "eval:\n", ("error: {f}:7:1: eval: is empty; give its settings, indented below it, or "
                                         "delete the line")),
    "entry": (GOOD.replace("mock: true", "blend:\n    - {path: a, weight: heavy}"),
              "error: {f}:5:17: data.blend[0].weight: Value 'heavy' of type 'str' could not be converted to Float"),
    "entry key": (GOOD.replace("mock: true", "blend:\n    - {path: a, wieght: 1}"),
                  ("error: {f}:5:17: data.blend[0].wieght: not a setting; did you mean data.blend[0].weight? "
                   "(keizoku config defaults lists every setting)")),
    "duplicate": (GOOD + "model: {hf_path: b}\n",
                  "error: {f}:7:1: invalid YAML: found duplicate key model (while constructing a mapping at 1:1)"),
}


OFFENDING = {"syntax": "  4 | train:", "tab": "  2 |   hf_path: a", "duplicate": "  7 | model: {hf_path: b}"}


@pytest.mark.parametrize("case", list(BAD_YAML))
def test_a_broken_yaml_names_its_line_and_key(tmp_path, case):
    text, expected = BAD_YAML[case]
    (tmp_path / "run.yaml").write_text(text)
    lines = _fails(tmp_path, "train", "run.yaml", status=2)
    assert lines[0] == expected.format(f="run.yaml"), lines
    assert lines[1:] == ([OFFENDING[case]] if case in OFFENDING else []), lines  # a syntax error: the line itself
    if case in ("syntax", "type", "unknown"):  # config check: the same lines; its exit status for a bad config is 1
        assert _fails(tmp_path, "config", "check", "run.yaml", status=1) == lines


OVERRIDES = {
    "train.global_batch=4": "train.global_batch: not a setting; did you mean train.global_batch_size? "
                            "(keizoku config defaults lists every setting)",
    "global_batch_size=4": "global_batch_size: not a setting; did you mean train.global_batch_size?",
    "traim.max_steps=3": "traim: not a setting; did you mean train.max_steps",
    "lr=1e-4": "lr: not a setting; did you mean optim.lr?",
    "data.seq_length=long": "data.seq_length: Value 'long' of type 'str' could not be converted to Integer",
    "schedule.kind=linear": "schedule.kind: Invalid value 'linear', expected one of ['cosine', 'wsd', 'constant']",
    "optim.betas=[0.9]": "optim.betas: must be a list of 2 values, not 1",
    "data.blend=[{path: a, wieght: 1}]": "data.blend[0].wieght: not a setting; did you mean data.blend[0].weight?",
    "data.blend=[{weight: 1}]": "data.blend[0].path: required, and not given",
    "data.blend=[{path:": "the value is not valid YAML (expected the node content, but found '<stream end>'); "
                          "quote the whole override as one shell word: 'data.blend=...'",
    "data.blend[0].path=x": "one element of a list cannot be set on its own; give the whole list: 'data.blend=[...]'",
}


@pytest.mark.parametrize("override", list(OVERRIDES))
def test_a_bad_override_is_blamed_on_the_override(tmp_path, override):
    (tmp_path / "run.yaml").write_text(GOOD)
    lines = _fails(tmp_path, "train", "run.yaml", override, status=2)
    assert len(lines) == 1 and lines[0].startswith(f"error: override {override}: {OVERRIDES[override]}"), lines
    assert "run.yaml" not in lines[0]
    if override == "train.global_batch=4":
        assert _fails(tmp_path, "config", "check", "run.yaml", override, status=1) == lines


def test_an_override_without_a_value(tmp_path):
    (tmp_path / "run.yaml").write_text(GOOD)
    assert _fails(tmp_path, "train", "run.yaml", "train.max_steps", status=2) == [
        "error: override 'train.max_steps': expected key.path=value"]


def test_unreadable_config(tmp_path):
    (tmp_path / "latin1.yaml").write_bytes(b"model:\n  hf_path: caf\xe9\n")
    assert _fails(tmp_path, "train", "latin1.yaml", status=2) == [
        "error: latin1.yaml:2: not UTF-8 text (byte 0xe9); save the file as UTF-8"]
    assert _fails(tmp_path, "train", "missing.yaml", status=2) == [
        "error: missing.yaml: cannot read (No such file or directory)"]


def _tokenized(tmp_path):
    """Two keys of one long-named input: two datasets whose names differ only in their key."""
    src = tmp_path / "corpus" / "a-rather-long-directory-name-for-the-japanese-wikipedia-dump" / "part-00001.jsonl"
    write_jsonl(src, [{"text": "hello world " * i, "title": f"title {i}"} for i in range(4)])
    out = tmp_path / "tokenized-output-directory-with-a-long-name"
    return keizoku("tokenize", tmp_path / "corpus", "-t", SAMPLE_TOKENIZER, "-o", out, "-k", "text", "-k", "title",
                   env=_env()), out


def test_tables_are_not_cut_when_output_is_no_terminal(tmp_path):
    proc, out = _tokenized(tmp_path)
    rows = [ln for ln in proc.stdout.splitlines() if "part-00001" in ln]
    name = "a-rather-long-directory-name-for-the-japanese-wikipedia-dump/part-00001"
    assert [re.sub(r"\s+", " ", ln.split("│")[1]).strip() for ln in rows] == [f"{name} [text]", f"{name} [title]"]
    assert max(len(ln) for ln in proc.stdout.splitlines()) > 80 and "…" not in proc.stdout
    listing = keizoku("inspect", out, env=_env()).stdout
    names = [ln.split("│")[1].strip() for ln in listing.splitlines() if "part-00001" in ln]
    assert names == [f"{name}_text_document", f"{name}_title_document"] and "…" not in listing
    # COLUMNS still sets the width
    narrow = keizoku("inspect", out, env=_env(COLUMNS="70")).stdout
    assert max(len(ln) for ln in narrow.splitlines()) <= 70


def test_help_has_no_bool_metavar_and_one_meaning_per_short_flag():
    import typer
    from typer.testing import CliRunner

    from keizoku.cli import app

    commands, meaning = [], {}

    def walk(cmd, path: list[str]) -> None:
        commands.append(path)
        for sub_name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, path + [sub_name])
        for param in (p for p in cmd.params if p.param_type_name == "option"):
            shorts = [o for o in param.opts + param.secondary_opts if not o.startswith("--")]
            longs = [o for o in param.opts if o.startswith("--")]
            for short in shorts:
                meaning.setdefault(short, set()).add(longs[0].replace("--output-dir", "--out"))

    walk(typer.main.get_command(app), [])
    bad = {short: longs for short, longs in meaning.items() if len(longs) > 1}
    assert not bad, f"a short flag with several meanings: {bad}"
    assert "<bool>" not in keizoku("tokenize", "--help").stdout  # the real CLI; every command's, in this process:
    runner = CliRunner()
    for path in commands:
        text = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "200"}).output
        assert "Usage:" in text and "<bool>" not in text, (path, text)
