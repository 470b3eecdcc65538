"""Sharded tokenizing: the plan (shares disjoint, complete, in order, balanced; byte ranges cut at line starts), a
sharded run merged byte for byte equal to one run, what the merge refuses, and the array-job scripts of
`keizoku submit tokenize` (the real Grid Engine and Slurm runs are in test_launch_gridengine.py and
test_launch_slurm.py)."""

from __future__ import annotations

import json
import random
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import SAMPLE_TOKENIZER, keizoku, write_corpus
from megatron.core.datasets.indexed_dataset import IndexedDataset

from keizoku.data import shards
from keizoku.data.indexed import IndexedDatasetReader, IndexedDatasetWriter, concatenate
from keizoku.data.merge import MergeError, merge
from keizoku.data.pipeline import TokenizeError
from keizoku.data.tokenize import TokenizeOptions, tokenize


def quiet(_msg: str) -> None:
    pass


# --- the plan ------------------------------------------------------------------------------------------------------

def test_plan_is_disjoint_complete_in_order_and_balanced():
    rng = random.Random(0)
    for trial in range(300):
        m = rng.randint(0, 12)
        sizes = [rng.choice([0, rng.randint(1, 100), rng.randint(1, 10_000)]) for _ in range(m)]
        split = [rng.random() < 0.5 for _ in range(m)]
        if trial % 3 == 0:
            split = [True] * m
        n = rng.randint(1, 9)
        shares = shards.assign(sizes, split, n)
        assert len(shares) == n
        pieces = [p for s in shares for p in s]
        # in order, every file exactly once from its first byte to its last, whole unless it may be split
        assert pieces == sorted(pieces)
        for i, size in enumerate(sizes):
            mine = [(a, b) for j, a, b in pieces if j == i]
            assert mine[0][0] == 0 and mine[-1][1] == size and all(x[1] == y[0] for x, y in zip(mine, mine[1:]))
            assert all(a < b for a, b in mine) or mine == [(0, 0)]
            assert len(mine) == 1 or split[i]
        # balanced: a cut is off its target by at most half a file that cannot be split, or 1 % of a share
        total = sum(sizes)
        worst = max([s for s, ok in zip(sizes, split) if not ok] + [2 * shards.SNAP * total / n]) + 2
        for s in shares:
            assert abs(sum(b - a for _, a, b in s) - total / n) <= worst, (sizes, split, n, shares)


def test_plan_spreads_one_large_file_and_pins_itself(tmp_path, ja_texts, en_texts):
    inputs = write_corpus(tmp_path / "in", ja_texts, en_texts)
    from keizoku.data.inputs import discover

    found = discover([str(inputs)])
    plan = shards.make_plan(found, 3, {"dir": str(tmp_path / "out")})
    sizes = {f.name: f.path.stat().st_size for f in found}
    big = [k for k in range(1, 4) for f in plan.share(k) if f.name == "big"]
    assert big == [1, 2, 3]  # the only large plain file, in every share; the gzip one whole
    assert [f.name for f in plan.share(1)] == ["a", "big"] and plan.share(1)[0].span is None
    assert abs(plan.share_bytes(1) - sum(sizes.values()) / 3) < 0.02 * sum(sizes.values())
    root = tmp_path / "out/parts"
    shards.pin_plan(root, plan)
    shards.pin_plan(root, shards.make_plan(discover([str(inputs)]), 3, {"dir": str(tmp_path / "out")}))  # same
    with (inputs / "c.jsonl").open("a") as f:
        f.write("\n")
    with pytest.raises(shards.ShardError, match=r"planned for .*c\.jsonl at [\d,]+ bytes, and it has [\d,]+ now"):
        shards.pin_plan(root, shards.make_plan(discover([str(inputs)]), 3, {"dir": str(tmp_path / "out")}))
    with pytest.raises(shards.ShardError, match="planned for 3 shares, and this run asks for 4"):
        shards.pin_plan(root, shards.make_plan(found, 4, {"dir": str(tmp_path / "out")}))


def test_byte_ranges_own_the_lines_that_start_in_them(tmp_path):
    """Any cuts, any chunk size: consecutive ranges own every line once, each the lines that start in it."""
    lines = [b'{"text": "a"}', b"", b'{"text": "' + b"b" * 300 + b'"}', b'{"text": "c"}', b"x", b"", b"",
             b'{"text": "' + b"d" * 50 + b'"}']
    rng = random.Random(1)
    for ending in (b"\n", b""):
        data = b"\n".join(lines) + ending
        path = tmp_path / f"f{len(ending)}.jsonl"
        path.write_bytes(data)
        starts = [0] + [i + 1 for i, ch in enumerate(data) if ch == 10 and i + 1 < len(data)]
        for _ in range(300):
            cuts = sorted(rng.sample(range(1, len(data)), rng.randint(0, 4)))
            bounds = [0, *cuts, len(data)]
            owned, hashed_end = [], 0
            for a, b in zip(bounds, bounds[1:]):
                reader = shards.RangeReader(path, (a, b), rng.choice([1, 7, 64, 4096]))
                chunks = list(reader)
                got = b"".join(data[c.offset:c.offset + c.length] for c in chunks)
                mine = [s for s in starts if a <= s < b]
                assert got == data[mine[0]:(starts + [len(data)])[starts.index(mine[-1]) + 1]] if mine else got == b""
                assert all(c.offset in starts for c in chunks)
                assert reader.lines == len(mine) and reader.hashed[0] == max(a - 1, 0)
                assert reader.hashed[1] >= hashed_end and all(c.located == (a > 0) for c in chunks)
                hashed_end = reader.hashed[1]
                owned.append(got)
            assert b"".join(owned) == data


def test_concatenate_equals_one_writer(tmp_path):
    """Parts (one of them empty, documents of zero tokens) concatenated: what one writer of all their documents
    writes, byte for byte; megatron-core reads it; a single part is hard-linked."""
    rng = np.random.default_rng(0)
    ref = IndexedDatasetWriter(tmp_path / "ref", np.uint16)
    parts = []
    for k, docs in enumerate((50, 0, 1, 300)):
        w = IndexedDatasetWriter(tmp_path / f"p{k}", np.uint16)
        lengths = rng.integers(0, 40, docs).astype(np.int32)
        lengths[::7] = 0
        tokens = rng.integers(0, 8000, int(lengths.sum())).astype(np.uint16)
        for writer in (w, ref):
            writer.add_chunk(tokens, lengths)
        w.finalize()
        parts.append(tmp_path / f"p{k}")
    ref.finalize()
    made = concatenate(parts, tmp_path / "all")
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"all{ext}").read_bytes() == (tmp_path / f"ref{ext}").read_bytes(), ext
    assert (made.documents, made.tokens, made.linked) == (351, ref.tokens, False)
    assert len(IndexedDataset(str(tmp_path / "all")).document_indices) == 352
    one = concatenate(parts[3:], tmp_path / "one")
    assert one.linked and (tmp_path / "one.bin").stat().st_ino == (tmp_path / "p3.bin").stat().st_ino
    assert not list(tmp_path.glob(".tmp*"))


# --- a sharded run, merged -----------------------------------------------------------------------------------------

def run(opts: TokenizeOptions, shard=None):
    return tokenize(replace(opts, shard=shard), progress=False, log=quiet)


def assert_same(a: str, b: str) -> None:
    for ext in (".bin", ".idx"):
        assert Path(a + ext).read_bytes() == Path(b + ext).read_bytes(), f"{a}{ext} differs from {b}{ext}"


@pytest.mark.parametrize("mode", ["dir", "prefix"])
def test_shards_merged_equal_one_run(tmp_path, ja_texts, en_texts, mode):
    """Three shares (the large plain file in all three, its bad lines skipped in each), merged: the .bin/.idx of
    one run over the same inputs, byte for byte, and the same counts and skipped records (real line numbers);
    a share run again has nothing to do, before and after the merge."""
    inputs = write_corpus(tmp_path / "in", ja_texts, en_texts, bad_lines=True)
    out = {"dir": {"output_dir": tmp_path / "sharded"}, "prefix": {"output_prefix": str(tmp_path / "sharded/all")}}
    one_out = {"dir": {"output_dir": tmp_path / "one"}, "prefix": {"output_prefix": str(tmp_path / "one/all")}}
    base = TokenizeOptions([str(inputs)], str(SAMPLE_TOKENIZER), workers=1, on_error="skip", chunk_bytes=40_000)
    one = run(replace(base, **one_out[mode]))
    opts = replace(base, **out[mode])
    for k in (1, 2, 3):
        run(opts, (k, 3))
    assert all(d.up_to_date for d in run(opts, (2, 3)).datasets)
    result = merge(**out[mode], log=quiet)
    assert [d.status for d in result.datasets] == (["linked", "merged", "linked", "linked"] if mode == "dir"
                                                   else ["merged"])
    for d in one.datasets:
        merged = d.prefix.replace(str(tmp_path / "one"), str(tmp_path / "sharded"))
        assert_same(d.prefix, merged)
        if d.tokens:
            assert len(IndexedDataset(merged).document_indices) == d.documents + 1
    manifests = [json.loads((tmp_path / f"{x}/keizoku-manifest.json").read_text())["datasets"]
                 for x in ("one", "sharded")]
    assert manifests[0].keys() == manifests[1].keys()
    for name, entry in manifests[0].items():
        got = manifests[1][name]
        for key in ("documents", "empty_documents", "tokens", "bin_bytes", "idx_bytes", "input_bytes", "flags",
                    "dtype"):
            assert got[key] == entry[key], (name, key)
        assert got["skipped"]["by_reason"] == entry["skipped"]["by_reason"]
        assert [(Path(x["path"]).name, x["line"], x["reason"]) for x in got["skipped"]["examples"]] == \
            [(Path(x["path"]).name, x["line"], x["reason"]) for x in entry["skipped"]["examples"]]
        assert [i["path"] for i in got["inputs"]] == [i["path"] for i in entry["inputs"]]
        assert got["tokenizer"]["fingerprint"] == entry["tokenizer"]["fingerprint"]
    big = manifests[1]["big_text_document" if mode == "dir" else "all_text_document"]
    split = next(i for i in big["inputs"] if "ranges" in i)
    assert split["sha256"] is None and len(split["ranges"]) == 3 and sum(r["lines"] for r in split["ranges"]) == 497
    assert [d.status for d in merge(**out[mode], log=quiet).datasets] == ["up to date"] * len(result.datasets)
    assert run(opts, (3, 3)).datasets == []  # merged and current: the share has nothing left to do
    assert not list((tmp_path / "sharded").rglob(".tmp*"))


def test_a_bad_line_in_a_share_is_located(tmp_path, ja_texts, en_texts):
    """--on-error stop: a share that begins inside a file names the line by its number in the share and its byte
    offset in the file; the first share of a file gives the real line number."""
    inputs = write_corpus(tmp_path / "in", ja_texts, en_texts, bad_lines=True)
    opts = TokenizeOptions([str(inputs)], str(SAMPLE_TOKENIZER), output_dir=tmp_path / "out", workers=1)
    data = (inputs / "big.jsonl").read_bytes()
    with pytest.raises(TokenizeError, match=re.escape(f"{inputs / 'big.jsonl'}:51: malformed JSON")):
        run(opts, (1, 3))
    with pytest.raises(TokenizeError) as e:
        run(opts, (2, 3))
    m = re.fullmatch(re.escape(str(inputs / "big.jsonl")) + r" \(share from byte ([\d,]+)\):(\d+): blank line: at byte "
                     r"offset ([\d,]+)", str(e.value))
    assert m, str(e.value)
    start, offset = (int(m.group(i).replace(",", "")) for i in (1, 3))
    assert data.count(b"\n", 0, offset) == 300  # the 301st line of the file
    first = data.index(b"\n", start - 1) + 1
    assert data.count(b"\n", first, offset) + 1 == int(m.group(2))
    assert not (tmp_path / "out/parts/shard-2-of-3/big_text_document.bin").exists()


def test_merge_refuses_incomplete_or_disagreeing_shares(tmp_path, ja_texts, en_texts):
    """Nothing is written while a share has not run, is incomplete or was tokenized with other flags, or where a
    destination holds a dataset that is not keizoku's; each message says which and what to do."""
    inputs = write_corpus(tmp_path / "in", ja_texts, en_texts)
    out = tmp_path / "out"
    opts = TokenizeOptions([str(inputs)], str(SAMPLE_TOKENIZER), output_dir=out, workers=1)
    run(opts, (1, 3))
    run(opts, (3, 3))
    proc = keizoku("tokenize-merge", "-o", out, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert re.fullmatch(r"error: \S+/out/parts: 1 of 3 shares are not complete: share 2 \(not run: no \S+/out/parts/"
                        r"shard-2-of-3/keizoku-manifest\.json\); run them \(keizoku tokenize … --shard K/3: a rerun "
                        r"resumes\), then merge again\n", proc.stderr), proc.stderr
    assert keizoku("tokenize-merge", "-o", out, "--check", check=False).returncode == 1
    run(replace(opts, add_bos=True), (2, 3))
    with pytest.raises(MergeError, match=r"share 2 was tokenized with other flags than share 1 \(add_bos: True vs "
                                         r"False\); run the shares that differ again"):
        merge(out, log=quiet)
    run(opts, (2, 3))  # again with the others' flags: redone
    (out / "parts/shard-3-of-3/c_text_document.idx").write_bytes(b"")  # damaged
    with pytest.raises(MergeError, match=r"share 3 \(incomplete: 1 of 3 datasets not made \(or out of date\): c\)"):
        merge(out, log=quiet)
    assert not list(out.glob("*.bin")) and not (out / "keizoku-manifest.json").exists()
    run(opts, (3, 3))
    (out / "a_text_document.bin").write_bytes(b"mine")  # not keizoku's: kept unless --overwrite
    with pytest.raises(MergeError, match=r"a_text_document\.bin: exists, and \S+ does not list it as keizoku's; "
                                         r"move it away, or pass --overwrite"):
        merge(out, log=quiet)
    assert (out / "a_text_document.bin").read_bytes() == b"mine"
    merge(out, overwrite=True, remove_parts=True, log=quiet)
    assert IndexedDatasetReader(out / "a_text_document").document(0).size > 0
    assert sorted(p.name for p in (out / "parts").iterdir()) == []  # parts and plan removed, on request
    for k in (1, 2, 3):  # submitted again: each share finds its datasets merged and current
        assert run(opts, (k, 3)).datasets == []
    assert {d.status for d in merge(out, log=quiet).datasets} == {"up to date"}


# --- keizoku submit tokenize --------------------------------------------------------------------------------------

def test_submit_tokenize_writes_array_jobs_and_a_merge_after_them(tmp_path, ja_texts, en_texts):
    """--dry-run: for each scheduler, an array of N tasks each running its share, and a merge that waits for
    them (afterok where the scheduler has it); nothing written."""
    from keizoku.launch.profile import load_profile
    from keizoku.launch.submit import submit_tokenize

    inputs = write_corpus(tmp_path / "in", ja_texts, en_texts)
    args = [str(inputs), "-t", str(SAMPLE_TOKENIZER), "-o", str(tmp_path / "out"), "-j", "4"]
    opts = TokenizeOptions([str(inputs)], str(SAMPLE_TOKENIZER), output_dir=tmp_path / "out")
    expect = {"gridengine": ("#$ -t 1-3", '--shard "${SGE_TASK_ID}/3"', ["-hold_jid", "<tokenize job>"]),
              "slurm": ("#SBATCH --array=1-3", '--shard "${SLURM_ARRAY_TASK_ID}/3"',
                        ["--dependency=afterok:<tokenize job>", "--kill-on-invalid-dep=yes"]),
              "pbs": ("#PBS -J 1-3", '--shard "${PBS_ARRAY_INDEX}/3"', ["-W", "depend=afterok:<tokenize job>"])}
    for scheduler, (array, shard, wait) in expect.items():
        prof = load_profile({"gridengine": "tsubame4", "slurm": "slurm", "pbs": "abci3"}[scheduler],
                            ["nodes=1", "group=g1", "warning_signal_s=0", "stop_margin_s=0"])
        sub = submit_tokenize(args, opts, prof, tasks=3, dry_run=True, log=quiet)
        assert array in sub.task_text and shard in sub.task_text.splitlines()[-1], sub.task_text
        assert "-notify" not in sub.task_text and "--signal" not in sub.task_text
        assert sub.merge_text.splitlines()[-1].endswith(f"-m keizoku tokenize-merge --output-dir {tmp_path / 'out'}")
        assert array not in sub.merge_text
        assert all(w in sub.commands[1] for w in wait) and not any(w in sub.commands[0] for w in wait)
    assert not (tmp_path / "out").exists()
    proc = keizoku("submit", "tokenize", "--profile", "slurm", "--tasks", "2", "--dry-run", "--", *args)
    assert "#SBATCH --array=1-2" in proc.stdout and "#   1: a.jsonl.gz, big.jsonl [bytes 0–" in proc.stdout
    bad = keizoku("submit", "tokenize", "--profile", "slurm", "--tasks", "2", "--", *args, "--shard", "1/2",
                  check=False)
    assert bad.returncode == 2 and "leave it out of the tokenize arguments" in bad.stderr
