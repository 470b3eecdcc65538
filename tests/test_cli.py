"""The CLI surface: --version, --help everywhere, inspect."""

from __future__ import annotations

import pytest

from conftest import keizoku, write_jsonl
from keizoku import __version__


def test_version_and_help():
    assert keizoku("--version").stdout.strip() == f"keizoku {__version__}"
    top = keizoku("--help").stdout
    assert "tokenize" in top and "inspect" in top


@pytest.mark.parametrize("command", ["tokenize", "inspect"])
def test_every_command_has_help(command):
    text = keizoku(command, "--help", env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"}).stdout
    assert "Usage:" in text and "--help" in text
    if command == "tokenize":
        for option in ("--tokenizer", "--output-dir", "--output-prefix", "--text-key", "--append-eod",
                       "--add-bos", "--use-fast", "--workers", "--on-error", "--force", "empty document"):
            assert option in text, option


def test_inspect_and_decode(tmp_path, tokenizer_dirs):
    texts = ["こんにちは、世界。", "", "A second English document with more words in it."]
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in texts])
    keizoku("tokenize", src, "-t", tokenizer_dirs["sample"], "-o", tmp_path / "out", "-q")
    env = {"COLUMNS": "200", "PATH": "/usr/bin:/bin"}
    text = keizoku("inspect", tmp_path / "out/in_text_document", "--decode", "3", env=env).stdout
    assert "uint16" in text and "in_text_document" in text
    assert "document length" in text
    assert "こんにちは、世界。<|end_of_text|>" in text and "more words in it.<|end_of_text|>" in text
    lines = [ln for ln in text.splitlines() if "in_text_document" in ln and "│" in ln]
    assert lines and lines[0].split("│")[2].strip() == "3" and lines[0].split("│")[3].strip() == "1"
    listing = keizoku("inspect", tmp_path / "out", env=env).stdout
    assert "in_text_document" in listing
    proc = keizoku("inspect", tmp_path / "missing", check=False)
    assert proc.returncode == 1 and "no dataset here" in proc.stderr
