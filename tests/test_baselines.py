"""Baselines against references written from their equations: MuonMax, Momo around Mano and
around MuonMax, single process and sharded (FSDP2 at 2 ranks, HSDP 2x2 for Momo's replicated
sums); Muon with the AdamW fallback; the factory and bad input."""

from __future__ import annotations

import copy
import math
from collections import Counter

import pytest
import torch
from torch import nn

from dist import run_distributed
from reference import ReferenceRun, adamw_reference_step
from test_sharded import MANO_NAMES, Net, _full, _shard

HP = dict(lr=0.02, momentum=0.9, weight_decay=0.1)
MOMO_LR = 1.0  # a cap above the Polyak step, so Momo's own step size decides (asserted below)
STEPS = 5


def ns_reference(M, steps=5, a=3.4445, b=-4.7750, c=2.0315):
    """Muon's quintic Newton-Schulz iteration on the wide orientation, float64."""
    X = M.reshape(M.shape[0], -1).double()
    wide = X.shape[0] <= X.shape[1]
    X = X if wide else X.T
    X = X / (X.norm() + 1e-7)
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return (X if wide else X.T).reshape(M.shape)


class MuonMaxReference:
    """M <- b M + (1-b) G; P = polar(M); N = sum <M, P>; W <- (1 - lr wd) W - lr s N P; AdamW else."""

    def __init__(self, params, matrix_names, *, lr, momentum, weight_decay, scale=10.0, betas=(0.9, 0.95), eps=1e-8):
        self.W = {n: p.detach().double().clone() for n, p in params.items()}
        self.matrices = set(matrix_names)
        self.M = {n: torch.zeros_like(self.W[n]) for n in self.matrices}
        self.m = {n: torch.zeros_like(w) for n, w in self.W.items() if n not in self.matrices}
        self.v = {n: torch.zeros_like(w) for n, w in self.W.items() if n not in self.matrices}
        self.count = {n: 0 for n in self.m}
        self.h = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, scale=scale, betas=betas, eps=eps)

    def step(self, grads, lr=None):
        h = self.h
        lr = h["lr"] if lr is None else lr
        P = {}
        for n in self.matrices:
            self.M[n] = h["momentum"] * self.M[n] + (1 - h["momentum"]) * grads[n].double()
            P[n] = ns_reference(self.M[n])
        N = sum(float((self.M[n] * P[n]).sum()) for n in self.matrices)
        for n in self.W:
            if n in self.matrices:
                self.W[n] = self.W[n] * (1 - lr * h["weight_decay"]) - lr * h["scale"] * N * P[n]
            else:
                self.count[n] += 1
                self.W[n], self.m[n], self.v[n] = adamw_reference_step(
                    self.W[n], self.m[n], self.v[n], grads[n], self.count[n], lr=lr, betas=h["betas"],
                    eps=h["eps"], weight_decay=h["weight_decay"])


class MomoReference:
    """Momo around a base reference: D = W - (W after a base step at lr 1), averages of loss, g
    and <g, x> with bias correction, tau = min(lr, max(h - f*, 0) / <d, D>), W <- W - tau D."""

    def __init__(self, base, *, lr, beta=0.9, f_star=0.0):
        self.base, self.lr, self.beta, self.f_star = base, lr, beta, f_star
        self.d = {n: torch.zeros_like(w) for n, w in base.W.items()}
        self.loss_avg = self.gx_avg = 0.0
        self.k = 0
        self.taus = []

    def step(self, grads, loss):
        b = self.beta
        W = {n: w.clone() for n, w in self.base.W.items()}
        self.k += 1
        for n in self.d:
            self.d[n] = b * self.d[n] + (1 - b) * grads[n].double()
        gx = sum(float((grads[n].double() * W[n]).sum()) for n in W)
        dx = sum(float((self.d[n] * W[n]).sum()) for n in W)
        probe = copy.deepcopy(self.base)
        probe.step(grads, lr=1.0)
        D = {n: W[n] - probe.W[n] for n in W}
        dD = sum(float((self.d[n] * D[n]).sum()) for n in W)
        self.loss_avg = b * self.loss_avg + (1 - b) * loss
        self.gx_avg = b * self.gx_avg + (1 - b) * gx
        c = 1 - b**self.k
        h = (self.loss_avg + dx - self.gx_avg) / c
        tau = min(self.lr, max(h - self.f_star, 0.0) / (dD / c))
        self.taus.append(tau)
        self.base = probe
        self.base.W = {n: W[n] - tau * D[n] for n in W}

    @property
    def W(self):
        return self.base.W


def _hp(name):
    return {**HP, "lr": MOMO_LR} if name.startswith("momo") else HP


def _reference(name, init):
    hp = _hp(name)
    if name == "muonmax":
        return MuonMaxReference(init, MANO_NAMES, **hp)
    if name == "momo-muonmax":
        return MomoReference(MuonMaxReference(init, MANO_NAMES, **hp), lr=hp["lr"])
    if name == "momo-mano":
        return MomoReference(ReferenceRun(init, MANO_NAMES, nesterov=True, **hp), lr=hp["lr"])
    raise ValueError(name)


def _run(name, model, init=None, steps=STEPS, hp=None):
    """Train ``steps`` steps recording the collectives of each ``step()``; with ``init``, also
    the reference from the same initial weights, and the errors against it at the end."""
    from mano_dist import CollectiveCounter
    from mano_dist.baselines import build_optimizer, needs_loss

    opt = build_optimizer(name, model, **(hp or _hp(name)))
    ref = _reference(name, init) if init is not None else None
    calls = []
    for step in range(steps):
        x = torch.randint(0, 11, (8, 4), generator=torch.Generator().manual_seed(step))
        loss = model(x).pow(2).mean() * 0.1 + 1.0  # positive, like a cross-entropy
        loss.backward()
        grads = {n: _full(p.grad).clone() for n, p in model.named_parameters()} if ref is not None else None
        with CollectiveCounter() as cc:
            opt.step(loss=loss.detach()) if needs_loss(opt) else opt.step()
        calls.append([(c.kind, c.payload_bytes) for c in cc.calls])
        opt.zero_grad()
        if isinstance(ref, MomoReference):
            ref.step(grads, loss.item())
        elif ref is not None:
            ref.step(grads)
    if ref is None:
        return {"calls": calls}
    errors = {n: (_full(p.detach()).double() - ref.W[n]).abs().max().item() for n, p in model.named_parameters()}
    taus = getattr(ref, "taus", [])
    return {"errors": errors, "calls": calls, "taus": taus}


NAMES = ("muonmax", "momo-mano", "momo-muonmax")


@pytest.mark.parametrize("name", NAMES)
def test_single_process_matches_reference(name):
    torch.manual_seed(0)
    model = Net().double()
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    r = _run(name, model, init)
    assert max(r["errors"].values()) < 1e-9, r["errors"]
    if name.startswith("momo"):  # the model-based step size decided, below the cap
        assert all(0 < t < MOMO_LR for t in r["taus"]), r["taus"]


def _sharded(rank, world_size, kind, names):
    out = {}
    for name in names:
        torch.manual_seed(0)
        model = Net().double()
        init = {n: p.detach().clone() for n, p in model.named_parameters()}
        out[name] = _run(name, _shard(model, kind, world_size), init)
        if name.startswith("momo"):
            torch.manual_seed(0)
            base = name.removeprefix("momo-")  # Momo's base optimizer alone, same sharding
            out[name]["base_calls"] = _run(base, _shard(Net().double(), kind, world_size), hp=_hp(name))["calls"]
    return out


@pytest.mark.distributed
@pytest.mark.parametrize("kind,world_size,names", [("fsdp", 2, NAMES), ("hsdp", 4, ("momo-mano",))])
def test_sharded_matches_reference(tmp_path, kind, world_size, names):
    results = run_distributed(_sharded, world_size, tmp_path, kind, names)
    for rank_result in results:
        for name, r in rank_result.items():
            worst = max(r["errors"].values())
            assert worst < 1e-9, (kind, name, r["errors"])
            for step, calls in enumerate(r["calls"]):
                kinds = {k for k, _ in calls}
                if name.startswith("momo"):  # the base's collectives + one 32-byte all-reduce
                    extra = Counter(calls)
                    extra.subtract(Counter(r["base_calls"][step]))
                    assert {k: v for k, v in extra.items() if v} == {("all_reduce", 32): 1}, (name, step, calls, r["base_calls"][step])
                if name == "momo-mano":  # Mano's statistics only: never a matrix
                    assert kinds <= {"all_reduce"}, calls


def test_muon_with_adamw_fallback_matches_torch_muon_and_adamw_rule():
    from mano_dist.baselines import MuonAdamW

    torch.manual_seed(0)
    w, b = nn.Parameter(torch.randn(5, 3)), nn.Parameter(torch.randn(5))
    w2 = nn.Parameter(w.detach().clone())
    ours = MuonAdamW([{"params": [w], "algorithm": "muon"}, {"params": [b], "algorithm": "adamw"}], lr=0.01)
    torch_muon = torch.optim.Muon([w2], lr=0.01, adjust_lr_fn="match_rms_adamw")
    m = v = torch.zeros(5, dtype=torch.float64)
    B = b.detach().double().clone()
    for step in range(1, 4):
        g = torch.randn(5, 3)
        gb = torch.randn(5)
        w.grad, w2.grad, b.grad = g.clone(), g.clone(), gb.clone()
        ours.step()
        torch_muon.step()
        B, m, v = adamw_reference_step(B, m, v, gb, step, lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    assert torch.equal(w, w2)
    assert (b.double() - B).abs().max() < 1e-6


def test_factory_names_routing_and_bad_input():
    from mano_dist import Mano
    from mano_dist.baselines import NAMES as ALL, MuonMax, build_optimizer

    model = Net()
    for name in ALL:
        opt = build_optimizer(name, model, lr=1e-3)
        algos = {g.get("algorithm", "adamw") for g in opt.param_groups}
        assert len(opt.param_groups) == 2, name
        if name != "adamw":
            assert "adamw" in algos and len(algos) == 2, (name, algos)
    with pytest.raises(ValueError, match="Unknown optimizer 'sgd'"):
        build_optimizer("sgd", model)
    with pytest.raises(ValueError, match="needs the loss"):
        build_optimizer("momo-mano", model).step()
    with pytest.raises(ValueError, match="Invalid scale"):
        MuonMax([nn.Parameter(torch.ones(2, 2))], scale=0.0)
    with pytest.raises(ValueError, match="MuonMax orthogonalises matrices"):
        MuonMax([nn.Parameter(torch.ones(3))])
    with pytest.raises(ValueError, match="Invalid momo_beta"):
        build_optimizer("momo-mano", model, momo_beta=1.0)
    assert isinstance(build_optimizer("mano", model), Mano)
