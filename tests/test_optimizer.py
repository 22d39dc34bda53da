"""Mano on plain tensors against the equations (tests/reference.py)."""

from __future__ import annotations

import copy
import math
import itertools

import pytest
import torch

from mano_dist import Mano
from reference import ReferenceRun, mano_reference_step

SHAPES = {
    "square": (8, 8),
    "tall": (12, 5),
    "wide": (5, 12),
    "row": (1, 9),
    "column": (9, 1),
    "conv3d": (6, 3, 4),
}


def make_params(dtype=torch.float64, seed=0, shapes=SHAPES):
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.nn.Parameter(torch.randn(s, generator=gen, dtype=dtype) * 0.5) for n, s in shapes.items()}


def grads_for(params, step, seed=1):
    gen = torch.Generator().manual_seed(seed * 1000 + step)
    return {n: torch.randn(p.shape, generator=gen, dtype=p.dtype) for n, p in params.items()}


def run_steps(opt, params, ref, steps, drop=lambda step, name: False):
    for step in range(steps):
        grads = grads_for(params, step)
        grads = {n: (None if drop(step, n) else g) for n, g in grads.items()}
        for n, p in params.items():
            p.grad = None if grads[n] is None else grads[n].clone()
        opt.step()
        if ref is not None:
            ref.step(grads)


@pytest.mark.parametrize("variant,nesterov", list(itertools.product(["v1", "v2", "both"], [True, False])))
def test_matches_reference_float64(variant, nesterov):
    params = make_params()
    hp = dict(lr=0.02, momentum=0.9, nesterov=nesterov, weight_decay=0.1, eps=1e-8, variant=variant)
    ref = ReferenceRun(params, params.keys(), **hp)
    opt = Mano(list(params.values()), **hp)
    run_steps(opt, params, ref, steps=7)
    for n, p in params.items():
        # A length-1 slice (1 x n reduced over rows) has T = 0 up to rounding, and T / clamp(|T|,
        # eps) amplifies that rounding by 1/eps: both sides agree only to ~1e-16/eps * lr.
        atol = 1e-9 if 1 in p.shape else 1e-12
        torch.testing.assert_close(p.detach(), ref.W[n], rtol=1e-11, atol=atol, msg=n)
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], ref.M[n], rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("variant,nesterov", list(itertools.product(["v1", "v2", "both"], [True, False])))
def test_matches_reference_float32(variant, nesterov):
    """fp32 within 1e-6 of the float64 reference after 7 steps, for every shape."""
    shapes = dict(SHAPES, big=(64, 48))
    if variant == "v1":
        # v1 on a length-1 slice (1 x n reduced over rows): T is 0 up to rounding and
        # T / clamp(|T|, eps) is rounding noise, in the official code too; float64 covers it.
        shapes = {n: s for n, s in shapes.items() if n not in ("row", "column")}
    params = make_params(dtype=torch.float32, shapes=shapes)
    hp = dict(lr=0.02, momentum=0.9, nesterov=nesterov, weight_decay=0.1, eps=1e-8, variant=variant)
    ref = ReferenceRun(params, params.keys(), **hp)
    opt = Mano(list(params.values()), **hp)
    run_steps(opt, params, ref, steps=7)
    for n, p in params.items():
        torch.testing.assert_close(p.detach().double(), ref.W[n], rtol=0, atol=1e-6, msg=n)


def test_bfloat16_params_accumulate_in_float32():
    """bf16 params: statistics in fp32, so the update equals the fp32 math up to bf16 rounding."""
    gen = torch.Generator().manual_seed(0)
    w0 = (torch.randn(256, 64, generator=gen) * 0.05).bfloat16()
    g = (torch.randn(256, 64, generator=gen) * 1e-3).bfloat16()
    p = torch.nn.Parameter(w0.clone())
    p.grad = g.clone()
    opt = Mano([p], lr=0.01)
    opt.step()
    # Reference: the same step on the bf16 inputs upcast (momentum after one step is exactly g).
    W_ref, _ = mano_reference_step(w0.float(), torch.zeros(256, 64), g.float(), 0, lr=0.01,
                                   momentum=0.95, nesterov=True, weight_decay=0.1, eps=1e-8, variant="v2")
    assert p.dtype == torch.bfloat16 and opt.state[p]["momentum_buffer"].dtype == torch.bfloat16
    torch.testing.assert_close(p.detach().double(), W_ref, rtol=1e-2, atol=1e-3)
    # fp32 statistics: the stored weight is the fp32 result rounded once to bf16, so its error is
    # that rounding's (measured ratio 1.001); statistics summed in bf16 add their own (ratio 1.37).
    rounding = (W_ref.bfloat16().double() - W_ref).norm()
    assert (p.detach().double() - W_ref).norm() <= 1.1 * rounding
    # The column-wise update magnitude is right: RMS of the update = lr * 0.2.
    delta = (w0.double() * (1 - 0.01 * 0.1) - p.detach().double())
    assert abs(delta.pow(2).mean().sqrt().item() / (0.01 * 0.2) - 1) < 0.02


def test_official_keywords_reproduce_official_rules():
    """Mano(mano_params=, adamw_params=, wd=) with v1/no-Nesterov = the official Mano; v2 = Mano_v2."""
    for variant, nesterov in (("v1", False), ("v2", True)):
        params = make_params(dtype=torch.float32, shapes={"w1": (16, 24), "w2": (24, 16), "emb": (30, 16), "bias": (16,)})
        ref = ReferenceRun(params, ["w1", "w2"], lr=3e-3, nesterov=nesterov, weight_decay=0.01, variant=variant)
        opt = Mano(mano_params=[params["w1"], params["w2"]], adamw_params=[params["emb"], params["bias"]],
                   lr=3e-3, wd=0.01, momentum=0.95, nesterov=nesterov, variant=variant,
                   adamw_betas=(0.9, 0.95), adamw_eps=1e-8)
        assert opt.param_groups[0]["weight_decay"] == 0.01
        run_steps(opt, params, ref, steps=6)
        for n, p in params.items():
            torch.testing.assert_close(p.detach().double(), ref.W[n], rtol=2e-6, atol=1e-7, msg=n)
        for n in ("emb", "bias"):
            assert opt.state[params[n]]["step"].item() == 6
            torch.testing.assert_close(opt.state[params[n]]["exp_avg"].double(), ref.m[n], rtol=1e-5, atol=1e-7)


def test_rotation_counts_optimizer_steps_not_params_or_grads():
    """A param without grad at a step is skipped, yet the shared rotation keeps advancing; the
    AdamW params keep their own bias-correction counts."""
    params = make_params(shapes={"a": (6, 4), "b": (4, 6), "emb": (5, 3)})
    ref = ReferenceRun(params, ["a", "b"], lr=0.02)
    opt = Mano([{"params": [params["a"], params["b"]]},
                {"params": [params["emb"]], "algorithm": "adamw"}], lr=0.02)
    drop = lambda step, name: (name == "b" and step in (1, 2)) or (name == "emb" and step == 3)  # noqa: E731
    run_steps(opt, params, ref, steps=6, drop=drop)
    for n, p in params.items():
        torch.testing.assert_close(p.detach(), ref.W[n], rtol=1e-11, atol=1e-12, msg=n)
    assert [g["step"] for g in opt.param_groups] == [6, 6]
    assert opt.state[params["emb"]]["step"].item() == 5


def test_one_step_call_per_group_as_deepspeed_does():
    """DeepSpeed swaps in one group at a time and calls step() per group: same trajectory."""
    params = make_params(shapes={"a": (6, 4), "b": (4, 6)})
    ref = ReferenceRun(params, ["a", "b"], lr=0.02)
    opt = Mano([{"params": [params["a"]]}, {"params": [params["b"]]}], lr=0.02)
    for step in range(5):
        grads = grads_for(params, step)
        for n, p in params.items():
            p.grad = grads[n].clone()
        groups = opt.param_groups
        for g in groups:
            opt.param_groups = [g]
            opt.step()
        opt.param_groups = groups
        ref.step(grads)
    for n, p in params.items():
        torch.testing.assert_close(p.detach(), ref.W[n], rtol=1e-11, atol=1e-12, msg=n)


def test_state_dict_round_trip_is_bit_exact_from_odd_step():
    def build(params):
        return Mano([{"params": [params["a"], params["b"]]},
                     {"params": [params["bias"]], "algorithm": "adamw"}], lr=0.02, variant="v2")

    shapes = {"a": (6, 4), "b": (4, 6), "bias": (4,)}
    p1 = make_params(dtype=torch.float32, shapes=shapes)
    o1 = build(p1)
    run_steps(o1, p1, None, steps=3)  # lands on an odd step: next axis is 1
    saved_params = {n: p.detach().clone() for n, p in p1.items()}
    saved = copy.deepcopy(o1.state_dict())
    run_steps_from(o1, p1, 3, 4)

    p2 = {n: torch.nn.Parameter(v.clone()) for n, v in saved_params.items()}
    o2 = build(p2)
    o2.load_state_dict(saved)
    assert o2.param_groups[0]["step"] == 3
    run_steps_from(o2, p2, 3, 4)
    for n in p1:
        assert torch.equal(p1[n], p2[n]), n


def run_steps_from(opt, params, start, count):
    for step in range(start, start + count):
        grads = grads_for(params, step)
        for n, p in params.items():
            p.grad = grads[n].clone()
        opt.step()


def test_eager_state_same_keys_before_any_step():
    params = make_params(shapes={"a": (3, 4), "bias": (4,)})
    opt = Mano([{"params": [params["a"]]}, {"params": [params["bias"]], "algorithm": "adamw"}])
    assert set(opt.state[params["a"]]) == {"momentum_buffer"}
    assert set(opt.state[params["bias"]]) == {"step", "exp_avg", "exp_avg_sq"}
    assert not any(isinstance(v, str) for s in opt.state.values() for v in s.values())


def test_lr_scheduler_zero_grad_add_param_group_and_closure():
    params = make_params(shapes={"a": (6, 4), "b": (4, 6)})
    ref = ReferenceRun(params, ["a", "b"], lr=0.02)
    opt = Mano([params["a"]], lr=0.02)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    grads = grads_for(params, 0)
    params["a"].grad = grads["a"].clone()
    loss = opt.step(closure=lambda: torch.tensor(1.5))
    assert loss.item() == 1.5
    ref.step({"a": grads["a"], "b": None}, lr=0.02)
    sched.step()
    opt.add_param_group({"params": [params["b"]], "lr": 0.01})
    assert opt.param_groups[1]["step"] == 1  # joins the rotation phase of the others
    assert "momentum_buffer" in opt.state[params["b"]]
    grads = grads_for(params, 1)
    for n, p in params.items():
        p.grad = grads[n].clone()
    opt.step()
    ref.step(grads, lr=0.01)
    for n, p in params.items():
        torch.testing.assert_close(p.detach(), ref.W[n], rtol=1e-11, atol=1e-12, msg=n)
    opt.zero_grad()
    assert all(p.grad is None for p in params.values())


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(lr=-1.0), "lr"),
        (dict(momentum=1.0), "momentum"),
        (dict(momentum=-0.1), "momentum"),
        (dict(eps=0.0), "eps"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(adamw_eps=0.0), "adamw_eps"),
        (dict(adamw_betas=(0.9, 1.0)), "adamw_betas"),
        (dict(variant="v3"), "variant"),
        (dict(nonfinite="zero"), "nonfinite"),
    ],
)
def test_invalid_hyperparameters_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        Mano([torch.nn.Parameter(torch.zeros(3, 3))], **kwargs)


def test_invalid_group_options_and_shapes():
    w = torch.nn.Parameter(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="algorithm"):
        Mano([{"params": [w], "algorithm": "sgd"}])
    with pytest.raises(ValueError, match="lr"):
        Mano([{"params": [w], "lr": -1}])
    with pytest.raises(ValueError, match=r"shape \(3,\).*adamw"):
        Mano([torch.nn.Parameter(torch.zeros(3))])
    with pytest.raises(ValueError, match=r"shape \(\)"):
        Mano([torch.nn.Parameter(torch.tensor(1.0))])
    Mano([{"params": [torch.nn.Parameter(torch.zeros(3))], "algorithm": "adamw"}])  # fine


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_skip_leaves_everything_untouched(bad):
    params = make_params(dtype=torch.float32, shapes={"a": (6, 4), "bias": (4,)})
    opt = Mano([{"params": [params["a"]]}, {"params": [params["bias"]], "algorithm": "adamw"}], lr=0.02)
    run_steps(opt, params, None, steps=1)
    before = {n: p.detach().clone() for n, p in params.items()}
    state_before = copy.deepcopy(opt.state_dict())
    params["a"].grad = torch.ones(6, 4)
    params["bias"].grad = torch.ones(4)
    params["bias"].grad[2] = bad
    opt.step()
    assert opt.skipped_steps == 1
    for n, p in params.items():
        assert torch.equal(p, before[n])
    after = opt.state_dict()
    # The rotation counts step() calls (the axis is chosen on the host before the device decides
    # to skip); AdamW's own step counts, moments, momentum and weights are untouched.
    assert after["param_groups"][0]["step"] == state_before["param_groups"][0]["step"] + 1 == 2
    assert after["param_groups"][0]["skipped_steps"] == 1
    for k, s in state_before["state"].items():
        for key, v in s.items():
            assert torch.equal(after["state"][k][key], v), key


def test_nonfinite_raise_names_the_parameter():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    from mano_dist import mano_param_groups
    opt = Mano(mano_param_groups(model, mano_patterns=[r"^1\.weight$"]), nonfinite="raise")
    model(torch.ones(1, 4)).sum().backward()
    w_before = model[0].weight.detach().clone()
    model[1].weight.grad[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"'1\.weight'"):
        opt.step()
    assert torch.equal(model[0].weight, w_before)


def test_one_round_sharded_formula_matches_reference_including_cancellation():
    """The sharded path (s_dw, s_dd, s_ww in one reduction) exercised in-process with a layout
    that declares every axis sharded and an identity all-reduce. Even when D is almost parallel
    to W (|T|^2 ~ 1e-9 |D|^2, where float32 sums lose every digit of |T|), the float64 sums of
    exact float32 products keep the one round as accurate as the float32 update itself: one
    reduction per step, no second round, no host read."""
    from mano_dist.functional import mano_matrix_step
    from mano_dist.layouts import BlockLayout, ReduceGroup
    from mano_dist.lockstep import run_lockstep

    calls = []

    def fake_all_reduce(buf, group):
        calls.append((buf.numel(), buf.dtype))

    gen = torch.Generator().manual_seed(0)
    for variant, axis, parallel in itertools.product(("v1", "v2"), (0, 1), (False, True)):
        W0 = torch.randn(7, 5, generator=gen, dtype=torch.float64)
        noise = torch.randn(7, 5, generator=gen, dtype=torch.float64)
        if parallel:  # unit slices and D almost parallel to W: the formula cancels
            W0 = W0 / W0.pow(2).sum(axis, keepdim=True).sqrt()
            D = 3 * W0 + 1e-4 * noise
        else:
            D = noise
        W0, D = W0.float(), D.float()  # the optimizer's operands: float32 master weights
        calls.clear()
        W = W0.clone()
        lay = BlockLayout((7, 5), {0: (ReduceGroup((0,), None),), 1: (ReduceGroup((0,), None),)})
        run_lockstep([(mano_matrix_step(W, D.clone(), lay, axis=axis, variant=variant, lr=0.1,
                                        weight_decay=0.1, eps=1e-8), lay)], fake_all_reduce)
        # the reference (float64, T formed explicitly) with momentum 0: M = g = D
        W_ref, _ = mano_reference_step(W0, torch.zeros_like(W0), D, axis, lr=0.1, momentum=0.0,
                                       nesterov=False, weight_decay=0.1, eps=1e-8, variant=variant)
        # float32 cannot beat forming T = D - b W in float32 (what a second, exact round did):
        # its rounding, u |D| per element, is all of T's size when D is almost parallel to W.
        b32 = (D.double() * W0.double()).sum(axis, keepdim=True)
        if variant == "v1":
            b32 = b32 / (W0.double() ** 2).sum(axis, keepdim=True)
        T32 = D - b32.float() * W0
        norm32 = T32.pow(2).sum(axis, keepdim=True).sqrt()
        norm32 = norm32.clamp(min=1e-8) if variant == "v1" else norm32 + 1e-8
        explicit = W0 * (1 - 0.1 * 0.1) - 0.1 * 0.2 * math.sqrt(W0.shape[axis]) * T32 / norm32
        error, explicit_error = ((x.double() - W_ref).abs().max() for x in (W, explicit))
        assert error <= 3 * explicit_error + 1e-6, (variant, axis, parallel, error, explicit_error)
        slices = W0.shape[1 - axis]
        assert calls == [(3 * slices, torch.float64)]
        if parallel:  # the same formula from float32 sums loses |T| entirely: the test sees cancellation
            s_dw, s_dd, s_ww = ((a * b).sum(axis) for a, b in ((D, W0), (D, D), (W0, W0)))
            b_ = s_dw / s_ww if variant == "v1" else s_dw
            s_tt32 = (s_dd - b_ * (2 * s_dw - b_ * s_ww)).clamp(min=0)
            exact = (norm32.squeeze(axis).double() - (1e-8 if variant == "v2" else 0)) ** 2
            assert ((s_tt32.double() - exact).abs() / exact).max() > 0.1