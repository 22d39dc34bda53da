"""Single-process references written from the equations in shared/notes/algorithm.md.

Deliberately naive (one param at a time, float64, no batching, no layouts) and sharing no code
with mano_dist: the implementation is tested *against* these.
"""

from __future__ import annotations

import math

import torch


def _norm(x, dim):
    return x.pow(2).sum(dim=dim, keepdim=True).sqrt()


def _dot(x, y, dim):
    return (x * y).sum(dim=dim, keepdim=True)


def mano_reference_step(W, M, g, t, *, lr, momentum, nesterov, weight_decay, eps, variant):
    """One Mano step on a full matrix (any >= 2-D shape). Returns (W_new, M_new), same shapes."""
    shape = W.shape
    W = W.reshape(shape[0], -1).double()
    M = M.reshape(shape[0], -1).double()
    g = g.reshape(shape[0], -1).double()
    M = momentum * M + g
    D = g + momentum * M if nesterov else M
    k = t % 2
    if variant == "v1":
        W_hat = W / _norm(W, k).clamp(min=eps)
        T = D - _dot(D, W_hat, k) * W_hat
        U = T / _norm(T, k).clamp(min=eps)
    elif variant == "v2":
        T = D - _dot(D, W, k) * W
        U = T / (_norm(T, k) + eps)
    elif variant == "both":
        U = D - _dot(D, W, 1 - k) * W
        U = U - _dot(U, W, k) * W
        U = U / _norm(U, 1 - k).clamp(min=eps)
        U = U / _norm(U, k).clamp(min=eps)
    else:
        raise ValueError(variant)
    W_new = W * (1 - lr * weight_decay) - lr * 0.2 * math.sqrt(W.shape[k]) * U
    return W_new.reshape(shape), M.reshape(shape)


def adamw_reference_step(W, m, v, g, step, *, lr, betas, eps, weight_decay):
    """The official code's AdamW fallback (eps added to sqrt(v) before bias correction).

    ``step`` is this param's count after the increment (1 on its first update)."""
    b1, b2 = betas
    W, m, v, g = (x.double() for x in (W, m, v, g))
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    step_size = lr * math.sqrt(1 - b2**step) / (1 - b1**step)
    W_new = W * (1 - lr * weight_decay) - step_size * m / (eps + v.sqrt())
    return W_new, m, v


class ReferenceRun:
    """Runs the references over a dict of named params, mirroring the optimizer's bookkeeping:
    one rotation counter per optimizer step; AdamW counts per param."""

    def __init__(self, params: dict, mano_names, *, lr, momentum=0.95, nesterov=True,
                 weight_decay=0.1, eps=1e-8, variant="v2", betas=(0.9, 0.95), adamw_eps=1e-8):
        self.W = {n: p.detach().double().clone() for n, p in params.items()}
        self.mano = set(mano_names)
        self.M = {n: torch.zeros_like(self.W[n]) for n in self.mano}
        self.m = {n: torch.zeros_like(w) for n, w in self.W.items() if n not in self.mano}
        self.v = {n: torch.zeros_like(w) for n, w in self.W.items() if n not in self.mano}
        self.count = {n: 0 for n in self.m}
        self.t = 0
        self.h = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                      eps=eps, variant=variant, betas=betas, adamw_eps=adamw_eps)

    def step(self, grads: dict, lr=None):
        h = dict(self.h)
        if lr is not None:
            h["lr"] = lr
        for n, g in grads.items():
            if g is None:
                continue
            if n in self.mano:
                self.W[n], self.M[n] = mano_reference_step(
                    self.W[n], self.M[n], g, self.t, lr=h["lr"], momentum=h["momentum"],
                    nesterov=h["nesterov"], weight_decay=h["weight_decay"], eps=h["eps"],
                    variant=h["variant"])
            else:
                self.count[n] += 1
                self.W[n], self.m[n], self.v[n] = adamw_reference_step(
                    self.W[n], self.m[n], self.v[n], g, self.count[n], lr=h["lr"],
                    betas=h["betas"], eps=h["adamw_eps"], weight_decay=h["weight_decay"])
        self.t += 1


def step_and_check_mano_matrices(optimizer, rtol=1e-5, atol=1e-7):
    """``optimizer.step()``, asserting every Mano matrix (plain tensors) moved as the equations say.

    Catches a no-op or wrong matrix step that a falling loss alone would not: the AdamW fallback
    on embeddings and head lowers the loss by itself."""
    before = [(p, g, p.detach().clone(), optimizer.state[p]["momentum_buffer"].clone(), p.grad.clone())
              for g in optimizer.param_groups if g.get("algorithm", "mano") == "mano"
              for p in g["params"] if p.grad is not None]
    steps = [g["step"] for g in optimizer.param_groups]
    optimizer.step()
    assert before, "no Mano matrix was stepped"
    for p, g, W, M, grad in before:
        W_ref, _ = mano_reference_step(W, M, grad, steps[0], lr=g["lr"], momentum=g["momentum"],
                                       nesterov=g["nesterov"], weight_decay=g["weight_decay"],
                                       eps=g["eps"], variant=g["variant"])
        torch.testing.assert_close(p.detach().double(), W_ref, rtol=rtol, atol=atol)


def assert_mano_update(before, after, *, lr, weight_decay, axis, rtol=1e-3):
    """``after`` is one Mano step from ``before``: W (1 - lr wd) - lr 0.2 sqrt(n_axis) U, where U
    has unit-norm slices along ``axis`` (v1/v2). Needs no gradients: two checkpoints suffice."""
    step = before.double() * (1 - lr * weight_decay) - after.double()
    norms = step.pow(2).sum(dim=axis).sqrt()
    expected = torch.full_like(norms, lr * 0.2 * math.sqrt(before.shape[axis]))
    torch.testing.assert_close(norms, expected, rtol=rtol, atol=0)
