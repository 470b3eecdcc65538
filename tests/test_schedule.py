"""Learning-rate schedules and optimizer groups."""

import math

import pytest
import torch

from keizoku.config import OptimConfig, ScheduleConfig
from keizoku.engines.torch.optim import adamw, param_groups
from keizoku.schedule import LRSchedule

OPT = OptimConfig(lr=1e-3, min_lr=1e-4)


def curve(kind, total=100, warmup=10, **kw):
    schedule = LRSchedule.of(OPT, ScheduleConfig(kind=kind, warmup_steps=warmup, **kw), total)
    return [schedule.lr_at(i) for i in range(total)]


@pytest.mark.parametrize("kind", ["cosine", "wsd", "constant"])
def test_warmup_is_linear_and_never_zero(kind):
    c = curve(kind)
    assert c[0] == pytest.approx(1e-4) and c[9] == pytest.approx(1e-3)
    assert all(b > a for a, b in zip(c[:9], c[1:10]))


def test_cosine_reaches_min_lr_at_the_last_step():
    c = curve("cosine")
    assert c[10] == pytest.approx(1e-3) and c[-1] == pytest.approx(1e-4)
    assert c[(10 + 99) // 2] == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 44 / 89)))
    assert all(b <= a + 1e-15 for a, b in zip(c[10:], c[11:]))


def test_wsd_is_flat_then_decays_linearly():
    c = curve("wsd", decay_fraction=0.2)
    assert c[10:79] == [pytest.approx(1e-3)] * 69
    assert c[-1] == pytest.approx(1e-4)
    steps = [c[i] - c[i + 1] for i in range(80, 98)]
    assert max(steps) - min(steps) < 1e-12  # linear


def test_constant_and_lambda():
    assert curve("constant")[-1] == pytest.approx(1e-3)
    schedule = LRSchedule.of(OPT, ScheduleConfig(kind="cosine", warmup_steps=10), 100)
    assert schedule.factor_at(99) == pytest.approx(0.1)
    assert (schedule.warmup_steps, schedule.decay_start, schedule.last_step) == (10, 10, 99)
    wsd = LRSchedule.of(OPT, ScheduleConfig(kind="wsd", warmup_steps=10, decay_fraction=0.2), 100)
    assert (wsd.decay_start, wsd.last_step) == (79, 99)  # the points engine megatron translates


def test_no_decay_groups():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 4))
    decay, no_decay = param_groups(model, 0.1)
    assert [p.shape for p in decay["params"]] == [(10, 4), (4, 4)]
    assert [p.shape for p in no_decay["params"]] == [(4,), (4,), (4,)] and no_decay["weight_decay"] == 0.0
    opt = adamw(model, OptimConfig(), "cpu")
    assert opt.param_groups[0]["betas"] == (0.9, 0.95) and opt.param_groups[0]["weight_decay"] == 0.1


# --- phases and extensions (keizoku.schedule.run_plan) ---------------------------------------------------------

from keizoku.config import DatasetEntry, KeizokuConfig, PhaseConfig, validate  # noqa: E402
from keizoku.schedule import run_length, run_plan  # noqa: E402


def phased(**more) -> KeizokuConfig:
    cfg = KeizokuConfig()
    cfg.model.hf_path = "m"
    cfg.data.blend = [DatasetEntry(path="main")]
    cfg.train.global_batch_size, cfg.data.seq_length = 4, 16
    cfg.optim.lr, cfg.optim.min_lr = 1e-3, 1e-4
    cfg.phases = [PhaseConfig(name="main", max_steps=10, warmup_steps=4),
                  PhaseConfig(name="anneal", max_tokens=6 * 64 - 10, blend=[DatasetEntry(path="hq")], decay="linear")]
    for k, v in more.items():
        setattr(cfg, k, v)
    return cfg


def test_phases_chain_their_rates_and_lengths():
    cfg = phased()
    assert validate(cfg) == []
    plan = run_plan(cfg)
    assert [(s.name, s.kind, s.index, s.first_step, s.steps) for s in plan.segments] == [
        ("main", "phase", 0, 0, 10), ("anneal", "phase", 1, 10, 6)]  # max_tokens: whole global batches, rounded up
    assert run_length(cfg).steps == 16 and run_length(cfg).tokens == 16 * 64
    assert [s.blend[0].path for s in plan.segments] == ["main", "hq"]  # a phase without blend: data.blend
    assert [s.blend_key for s in plan.segments] == ["data.blend", "phases[1].blend"]  # what messages name
    cfg.extensions = [PhaseConfig(name="more", max_steps=2)]
    assert [(s.blend[0].path, s.blend_key) for s in run_plan(cfg).segments][2] == ("hq", "phases[1].blend")
    cfg.extensions = []
    rates = [plan.lr_at(k) for k in range(16)]
    assert rates[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])  # warmup from 0, as a run without phases
    assert rates[4:10] == [1e-3] * 6
    # the anneal starts where main ended and reaches min_lr at its last step, linearly
    assert rates[10:] == pytest.approx([1e-3 - k * (0.9e-3 / 5) for k in range(6)])
    assert plan.segment_at(9).name == "main" and plan.segment_at(10).name == "anneal"
    assert plan.segment_at(16).name == "anneal"


def test_a_run_without_phases_is_one_segment_with_its_old_schedule():
    cfg = phased(phases=[])
    cfg.train.max_steps = 50
    cfg.schedule = ScheduleConfig(kind="wsd", warmup_steps=5, decay_fraction=0.2)
    plan = run_plan(cfg)
    old = LRSchedule.of(cfg.optim, cfg.schedule, 50)
    assert [s.kind for s in plan.segments] == ["run"] and plan.segments[0].schedule == old
    assert [plan.lr_at(k) for k in range(50)] == [old.lr_at(k) for k in range(50)]  # bit for bit


def test_an_extension_rewarms_from_where_the_run_ended_then_decays():
    """The documented re-warm: linear from the run's last rate to the new peak over W steps, then a cosine to min_lr
    at the extension's last step; the steps before keep their rates."""
    cfg = phased(phases=[])
    cfg.train.max_steps = 20
    cfg.schedule = ScheduleConfig(kind="cosine", warmup_steps=2)
    before = [run_plan(cfg).lr_at(k) for k in range(20)]
    cfg.extensions = [PhaseConfig(name="more", max_steps=10, warmup_steps=3, lr=5e-4, decay="cosine")]
    plan = run_plan(cfg)
    rates = [plan.lr_at(k) for k in range(30)]
    assert rates[:20] == before and before[-1] == pytest.approx(1e-4)
    end = before[-1]
    assert rates[20:23] == pytest.approx([end + (5e-4 - end) * (k + 1) / 3 for k in range(3)])
    last = 9  # the extension's own step index that reaches min_lr
    assert rates[23:] == pytest.approx(
        [1e-4 + (5e-4 - 1e-4) * 0.5 * (1 + math.cos(math.pi * (k - 3) / (last - 3))) for k in range(3, 10)])
    # continuing instead: no warmup, from where the rate is
    cfg.extensions = [PhaseConfig(name="more", max_steps=10, decay="constant")]
    assert [run_plan(cfg).lr_at(k) for k in range(20, 30)] == [end] * 10


def test_phase_settings_are_checked_with_their_key():
    bad = phased()
    bad.train.max_steps = 5
    bad.phases[1] = PhaseConfig(name="main", max_steps=None, warmup_steps=-1, lr=0.0)
    errors = "\n".join(validate(bad))
    assert "train.max_steps / train.max_tokens: the run's length is its phases'" in errors
    assert "phases[1].name: 'main' is used twice" in errors
    assert "phases[1]: give exactly one of max_steps and max_tokens" in errors
    assert "phases[1].warmup_steps" in errors and "phases[1].lr: must be > 0" in errors
    no_data = phased()
    no_data.data.blend = []
    assert any(e.startswith("data.blend: no training data given") and "or give every phase its blend" in e
               for e in validate(no_data))
    no_data.phases[0].blend = [DatasetEntry(path="x")]
    assert validate(no_data) == []
