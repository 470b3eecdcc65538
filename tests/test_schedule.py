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
