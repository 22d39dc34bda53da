"""The fused, compiled CPU step (ZeRO-Offload fragments) equals the eager step to float rounding."""

from __future__ import annotations

import pytest
import torch

from mano_dist.deepspeed import fused_cpu
from mano_dist.deepspeed.fragments import FlatFragmentLayout, in_unison
from mano_dist.functional import momentum_directions
from mano_dist.lockstep import run_lockstep

# (matrix shape, cuts as ZeRO ranks would hold them): partial head/tail rows, whole-row blocks of
# more and fewer rows than a column group (functional.COLUMN_GROUP_ROWS), an empty rank.
CASES = [((70, 9), [(0, 13), (13, 0), (13, 400), (413, 217)]), ((6, 5), [(0, 4), (4, 26)]), ((40, 3), [(0, 120)])]


def _run(shape, cuts, w, g, m, step_fn, direction_fn, axis, variant, nesterov):
    """One Mano step of every cut of a matrix; the cuts' partial sums added (as the all-reduce does)."""
    hyper = dict(axis=axis, variant=variant, lr=0.05, weight_decay=0.1, eps=1e-8)
    pieces = [slice(s, s + k) for s, k in cuts]
    dirs = direction_fn([g[p] for p in pieces], [m[p] for p in pieces], 0.9, nesterov)
    steps = [step_fn(FlatFragmentLayout(shape, s, k), w[p], d, **hyper) for (s, k), p, d in zip(cuts, pieces, dirs)]
    run_lockstep([(in_unison(steps), FlatFragmentLayout(shape, 0, 0))])


def _eager(layout, w, d, **hyper):
    return layout.matrix_step(w, d, **hyper)


@pytest.mark.parametrize("variant,nesterov", [("v1", False), ("v2", True), ("v2", False)])
def test_fused_step_equals_eager(variant, nesterov):
    """Two steps (both axes) on fp32 fragments, fused vs eager: weights, momentum, and the
    direction left in the gradient agree to float rounding; one row takes the exact second
    round (its direction is nearly parallel to its weight row)."""
    torch.manual_seed(0)
    for shape, cuts in CASES:
        numel = shape[0] * shape[1]
        w0, g0 = torch.randn(numel), torch.randn(numel)
        g0.view(shape)[2] = 3 * w0.view(shape)[2] + 0.05 * g0.view(shape)[2]  # nearly parallel: exact round
        out = {}
        for name, step_fn, direction_fn in (("eager", _eager, momentum_directions),
                                            ("fused", fused_cpu.fragment_step, fused_cpu.momentum_directions)):
            w, m = w0.clone(), torch.zeros(numel)
            for axis in (1, 0):  # rows first: row 2's direction is nearly parallel to its weight
                g = g0.clone()
                _run(shape, cuts, w, g, m, step_fn, direction_fn, axis, variant, nesterov)
            out[name] = (w, m, g)
        for got, want in zip(out["fused"], out["eager"]):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        assert not torch.equal(out["fused"][0], w0)
    # The compiled kernels ran: a fallback to eager would make this compare eager with eager (it
    # once did in CI, when another test's import of pip had broken setuptools' distutils shim).
    kernels = (fused_cpu.MOMENTUM_DIRECTION, fused_cpu.ROW_SUMS, fused_cpu.COLUMN_SUMS, fused_cpu.APPLY_UPDATE)
    assert [k.fn.__name__ for k in kernels if k.compiled in (None, False)] == []


def test_compile_failure_falls_back_to_eager_with_one_warning(monkeypatch):
    """If torch.compile fails, the same functions run eagerly (same numbers), after one warning."""
    def broken(fn, **_):
        def raise_(*args):
            raise RuntimeError("no compiler")
        return raise_

    monkeypatch.setattr(torch, "compile", broken)
    kernel = fused_cpu._Compiled(fused_cpu.row_sums)
    d, w = torch.randn(4, 3), torch.randn(4, 3)
    with pytest.warns(UserWarning, match="row_sums failed .*no compiler.*eager"):
        first = kernel(d, w)
    torch.testing.assert_close(first, fused_cpu.row_sums(d, w))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kernel(d, w)  # no second warning
