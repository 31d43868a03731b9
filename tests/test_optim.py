"""Learning-rate schedules with warmup, gradient clipping, and Adam vs AdamW weight decay."""

from __future__ import annotations

import math

import pytest
import torch

from tuner.study.params import SCHEDULES, ClippingParams, OptimizerParams, ScheduleParams
from tuner.training.optim import LRSchedule, build_optimizer, clip_gradients, grad_norm

TOTAL, PER_EPOCH = 200, 20
CPU = torch.device("cpu")


def curve(sched: ScheduleParams, total: int = TOTAL, per_epoch: int = PER_EPOCH) -> list[float]:
    s = LRSchedule(sched, total, per_epoch)
    return [s(i) for i in range(total)]


def shape_after_warmup(sched: ScheduleParams, q: float, epochs_after: float) -> float:
    """The named decay as a function of progress q (0..1) after warmup, written out independently."""
    m = sched.min_lr_fraction
    if sched.name == "constant":
        return 1.0
    if sched.name in ("cosine", "onecycle"):
        return m + (1 - m) * (1 + math.cos(math.pi * q)) / 2
    if sched.name == "linear":
        return 1 - (1 - m) * q
    if sched.name == "step":
        gamma = 0.1 if sched.gamma is None else sched.gamma
        return gamma ** len([mark for mark in (sched.milestones or (0.5, 0.75)) if q >= mark])
    if sched.name == "exponential":
        return (0.9 if sched.gamma is None else sched.gamma) ** epochs_after
    raise AssertionError(sched.name)


# ---------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", [n for n in SCHEDULES if n != "onecycle"])
@pytest.mark.parametrize("warmup", [0.0, 0.1, 0.25])
def test_warmup_then_named_shape(name: str, warmup: float) -> None:
    floor = 0.1 if name in ("cosine", "linear") else 0.0
    sched = ScheduleParams(name=name, warmup_fraction=warmup, min_lr_fraction=floor)
    values = curve(sched)
    w = round(warmup * TOTAL)
    assert all(v > 0 for v in values)
    if w:
        ramp = values[:w]
        # linear rise from 1/w to exactly 1 at the end of warmup
        assert ramp[0] == pytest.approx(1 / w)
        assert ramp[-1] == pytest.approx(1.0)
        steps = [b - a for a, b in zip(ramp, ramp[1:])]
        assert all(d == pytest.approx(1 / w) for d in steps)
        assert max(values) == pytest.approx(1.0)
    # afterwards, the named shape over the remaining steps
    for i in range(w, TOTAL):
        q = (i - w) / (TOTAL - w)
        assert values[i] == pytest.approx(shape_after_warmup(sched, q, (i - w) / PER_EPOCH), abs=1e-9), (i, values[i])
    assert values[w] == pytest.approx(1.0)  # the decay starts at the peak


def test_constant() -> None:
    assert curve(ScheduleParams(name="constant")) == [1.0] * TOTAL


@pytest.mark.parametrize("min_lr", [0.0, 0.05, 0.2])
def test_cosine_ends_near_min_lr_fraction(min_lr: float) -> None:
    values = curve(ScheduleParams(name="cosine", min_lr_fraction=min_lr))
    assert values[0] == pytest.approx(1.0)
    assert values[-1] == pytest.approx(min_lr, abs=1e-3)
    assert values[TOTAL // 2] == pytest.approx(min_lr + (1 - min_lr) / 2)
    assert all(b <= a for a, b in zip(values, values[1:]))  # never rises
    assert min(values) >= min_lr


def test_linear_decays_evenly() -> None:
    values = curve(ScheduleParams(name="linear", min_lr_fraction=0.1))
    diffs = [a - b for a, b in zip(values, values[1:])]
    assert all(d == pytest.approx(0.9 / TOTAL) for d in diffs)
    assert values[-1] == pytest.approx(0.1, abs=0.01)


@pytest.mark.parametrize("gamma,milestones", [(None, None), (0.5, (0.3,)), (0.2, (0.25, 0.5, 0.9))])
def test_step_drops_by_gamma_at_milestones(gamma: float | None, milestones: tuple[float, ...] | None) -> None:
    values = curve(ScheduleParams(name="step", gamma=gamma, milestones=milestones))
    g = 0.1 if gamma is None else gamma
    marks = milestones or (0.5, 0.75)
    drops = [i for i in range(1, TOTAL) if values[i] != values[i - 1]]
    assert drops == [round(m * TOTAL) for m in marks]
    for i in drops:
        assert values[i] / values[i - 1] == pytest.approx(g)
    assert values[0] == 1.0
    assert values[-1] == pytest.approx(g ** len(marks))


@pytest.mark.parametrize("gamma", [None, 0.5, 0.95])
def test_exponential_multiplies_by_gamma_per_epoch(gamma: float | None) -> None:
    values = curve(ScheduleParams(name="exponential", gamma=gamma))
    g = 0.9 if gamma is None else gamma
    for epoch in range(TOTAL // PER_EPOCH):
        assert values[epoch * PER_EPOCH] == pytest.approx(g ** epoch)
    for i in range(TOTAL - PER_EPOCH):
        assert values[i + PER_EPOCH] / values[i] == pytest.approx(g)
    assert all(b < a for a, b in zip(values, values[1:]))


@pytest.mark.parametrize("pct_start", [0.25, 0.3, 0.5])
def test_onecycle(pct_start: float) -> None:
    total = 1000
    values = curve(ScheduleParams(name="onecycle", pct_start=pct_start), total=total)
    w = round(pct_start * total)
    # starts near lr/25 and rises linearly
    assert 0.04 < values[0] <= 0.04 + 0.96 / w + 1e-12
    assert values[0] == pytest.approx(0.04, abs=0.005)
    rises = [b - a for a, b in zip(values[:w], values[1:w])]
    assert all(d == pytest.approx(0.96 / w) for d in rises)
    # peaks at pct_start
    peak = max(range(total), key=lambda i: values[i])
    assert values[peak] == pytest.approx(1.0)
    assert abs(peak - pct_start * total) <= 1
    # then anneals (cosine) towards 0
    tail = values[w:]
    assert all(b <= a for a, b in zip(tail, tail[1:]))
    assert values[-1] < 0.001


def test_onecycle_with_warmup_fraction_rises_over_it() -> None:
    values = curve(ScheduleParams(name="onecycle", warmup_fraction=0.1, pct_start=0.4), total=1000)
    peak = max(range(1000), key=lambda i: values[i])
    assert abs(peak - 100) <= 1
    assert values[0] == pytest.approx(0.04, abs=0.01)


def test_apply_sets_every_group() -> None:
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.Adam([{"params": [a]}, {"params": [b]}], lr=1.0)
    s = LRSchedule(ScheduleParams(name="cosine", warmup_fraction=0.1), 100, 10)
    for step in (0, 5, 50, 99):
        lr = s.apply(opt, step, 0.3)
        assert lr == pytest.approx(0.3 * s(step))
        assert [g["lr"] for g in opt.param_groups] == [lr, lr]


def test_degenerate_sizes() -> None:
    for name in SCHEDULES:
        s = LRSchedule(ScheduleParams(name=name, warmup_fraction=0.5), 0, 0)
        assert math.isfinite(s(0)) and s(0) > 0


# ---------------------------------------------------------------------------------------------
# Gradient clipping
# ---------------------------------------------------------------------------------------------

def params_with_grads(scale: float = 5.0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    shapes = [(4, 3), (7,), (2, 2, 2)]
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * scale
    params.append(torch.nn.Parameter(torch.ones(3)))  # no gradient: skipped
    return params


def l2(params: list[torch.nn.Parameter]) -> float:
    return math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in params if p.grad is not None))


def grads(params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    return [p.grad.clone() for p in params if p.grad is not None]


def test_clip_by_norm_bounds_global_norm() -> None:
    params = params_with_grads()
    before, norm0 = grads(params), l2(params)
    threshold = norm0 / 7
    norm, clipped = clip_gradients(params, ClippingParams(mode="norm", threshold=threshold))
    assert float(norm) == pytest.approx(norm0, rel=1e-5)  # the pre-clip norm is reported
    assert float(clipped) == 1.0
    after = l2(params)
    assert after <= threshold * (1 + 1e-6)
    assert after == pytest.approx(threshold, rel=1e-4)
    # the direction is kept: every gradient is scaled by the same factor
    factor = threshold / norm0
    for g0, p in zip(before, params):
        assert torch.allclose(p.grad, g0 * factor, rtol=1e-4, atol=1e-7)


def test_clip_by_norm_below_threshold_is_a_no_op() -> None:
    params = params_with_grads()
    before, norm0 = grads(params), l2(params)
    norm, clipped = clip_gradients(params, ClippingParams(mode="norm", threshold=norm0 * 2))
    assert float(clipped) == 0.0 and float(norm) == pytest.approx(norm0, rel=1e-5)
    for g0, p in zip(before, params):
        assert torch.allclose(p.grad, g0, rtol=1e-6, atol=0)


def test_clip_by_value_bounds_every_entry() -> None:
    params = params_with_grads()
    before, norm0 = grads(params), l2(params)
    threshold = 1.5
    assert max(float(g.abs().max()) for g in before) > threshold
    norm, clipped = clip_gradients(params, ClippingParams(mode="value", threshold=threshold))
    assert float(norm) == pytest.approx(norm0, rel=1e-5)
    assert float(clipped) == 1.0
    for g0, p in zip(before, params):
        assert float(p.grad.abs().max()) <= threshold
        assert torch.equal(p.grad, g0.clamp(-threshold, threshold))
    # entries inside the band are untouched, outside ones keep their sign
    inside = torch.cat([g.flatten() for g in before]).abs() < threshold
    assert inside.any() and (~inside).any()


def test_clip_by_value_below_threshold() -> None:
    params = params_with_grads(scale=0.1)
    before = grads(params)
    peak = max(float(g.abs().max()) for g in before)
    _, clipped = clip_gradients(params, ClippingParams(mode="value", threshold=peak * 1.01))
    assert float(clipped) == 0.0
    assert all(torch.equal(p.grad, g0) for g0, p in zip(before, params))


def test_no_clipping_leaves_grads_unchanged() -> None:
    params = params_with_grads(scale=1000.0)
    before, norm0 = grads(params), l2(params)
    norm, clipped = clip_gradients(params, ClippingParams(mode="none"))
    assert float(clipped) == 0.0
    assert float(norm) == pytest.approx(norm0, rel=1e-5)
    assert all(torch.equal(p.grad, g0) for g0, p in zip(before, params))


def test_grad_norm_without_grads() -> None:
    assert float(grad_norm([torch.nn.Parameter(torch.ones(3))])) == 0.0


# ---------------------------------------------------------------------------------------------
# Adam vs AdamW
# ---------------------------------------------------------------------------------------------

def reference_adam(w0: torch.Tensor, grads_seq: list[torch.Tensor], lr: float, betas: tuple[float, float],
                   eps: float, wd: float, decoupled: bool) -> torch.Tensor:
    """Adam (L2 penalty added to the gradient) or AdamW (decoupled decay), written out in float64."""
    w = w0.double().clone()
    m = torch.zeros_like(w)
    v = torch.zeros_like(w)
    b1, b2 = betas
    for t, g in enumerate(grads_seq, start=1):
        g = g.double()
        if decoupled:
            w = w * (1 - lr * wd)
        else:
            g = g + wd * w
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat, v_hat = m / (1 - b1 ** t), v / (1 - b2 ** t)
        w = w - lr * m_hat / (v_hat.sqrt() + eps)
    return w


def run_optimizer(name: str, w0: torch.Tensor, grads_seq: list[torch.Tensor], **knobs) -> torch.Tensor:
    p = torch.nn.Parameter(w0.clone())
    opt = build_optimizer([p], OptimizerParams(name=name, **knobs), CPU)
    for g in grads_seq:
        p.grad = g.clone()
        opt.step()
    return p.detach()


def test_adam_and_adamw_decay_weights_differently() -> None:
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(50, generator=gen) * 3
    grads_seq = [torch.randn(50, generator=gen) * 0.01 for _ in range(4)]  # same grads for both
    knobs = dict(lr=0.05, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    adamw = run_optimizer("adamw", w0, grads_seq, **knobs)
    adam = run_optimizer("adam", w0, grads_seq, **knobs)
    ref_kw = dict(lr=0.05, betas=(0.9, 0.999), eps=1e-8, wd=0.1)
    expected_w = reference_adam(w0, grads_seq, decoupled=True, **ref_kw)
    expected_l2 = reference_adam(w0, grads_seq, decoupled=False, **ref_kw)
    assert torch.allclose(adamw.double(), expected_w, atol=1e-5, rtol=0)
    assert torch.allclose(adam.double(), expected_l2, atol=1e-5, rtol=0)
    assert (adam - adamw).abs().max() > 1e-3  # they really differ
    # and without weight decay the two are the same optimizer
    knobs["weight_decay"] = 0.0
    assert torch.allclose(run_optimizer("adam", w0, grads_seq, **knobs),
                          run_optimizer("adamw", w0, grads_seq, **knobs), atol=1e-7, rtol=0)


def test_adamw_first_step_is_decoupled_decay() -> None:
    """One step by hand: AdamW shrinks w by (1 - lr·wd) and then takes the sign-like Adam step of g alone."""
    w0 = torch.tensor([2.0, -3.0, 0.5])
    g = torch.tensor([0.1, 0.2, -0.3])
    lr, wd = 0.01, 0.1
    out = run_optimizer("adamw", w0, [g], lr=lr, weight_decay=wd)
    expected = w0 * (1 - lr * wd) - lr * g / (g.abs() + 1e-8)
    assert torch.allclose(out, expected, atol=1e-7, rtol=0)
    adam = run_optimizer("adam", w0, [g], lr=lr, weight_decay=wd)
    g_l2 = g + wd * w0
    assert torch.allclose(adam, w0 - lr * g_l2 / (g_l2.abs() + 1e-8), atol=1e-7, rtol=0)
    assert not torch.allclose(adam, out, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name,cls", [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)])
def test_build_optimizer_passes_every_knob(name: str, cls: type) -> None:
    p = torch.nn.Parameter(torch.zeros(3))
    opt_params = OptimizerParams(name=name, lr=0.02, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.3, amsgrad=True)
    opt = build_optimizer([p], opt_params, CPU)
    assert type(opt) is cls
    group = opt.param_groups[0]
    assert group["lr"] == 0.02 and tuple(group["betas"]) == (0.8, 0.9) and group["eps"] == 1e-6
    assert group["weight_decay"] == 0.3 and group["amsgrad"] is True
    assert group["foreach"] is True and not group.get("fused")
