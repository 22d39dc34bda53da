"""mano_param_groups: hidden matrices to Mano; embeddings, head (tied or not), 1-D to AdamW."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mano_dist import Mano, classify_parameters, mano_param_groups
from reference import step_and_check_mano_matrices


class TinyLM(nn.Module):
    def __init__(self, vocab=50, dim=8, tie=False, head_name="lm_head"):
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(
            nn.ModuleDict({"wq": nn.Linear(dim, dim, bias=False), "w1": nn.Linear(dim, 3 * dim),
                           "norm": nn.LayerNorm(dim)}) for _ in range(2)
        )
        self.conv = nn.Conv1d(dim, dim, 3)  # >2-D: a Mano matrix viewed as (out, in*k)
        setattr(self, head_name, nn.Linear(dim, vocab, bias=False))
        if tie:
            getattr(self, head_name).weight = self.tok_embeddings.weight


def names(groups, algorithm):
    return [n for g in groups if g["algorithm"] == algorithm for n in g["param_names"]]


def test_default_routing():
    groups = mano_param_groups(TinyLM())
    assert names(groups, "mano") == ["layers.0.wq.weight", "layers.0.w1.weight", "layers.1.wq.weight",
                                     "layers.1.w1.weight", "conv.weight"]
    adamw = names(groups, "adamw")
    assert "tok_embeddings.weight" in adamw and "lm_head.weight" in adamw
    assert all(n in adamw for n in ("layers.0.w1.bias", "layers.0.norm.weight", "conv.bias"))


def test_tied_head_appears_once_on_adamw():
    model = TinyLM(tie=True)
    groups = mano_param_groups(model)
    assert "lm_head.weight" not in names(groups, "mano") + names(groups, "adamw")  # same tensor as the embedding
    assert names(groups, "adamw").count("tok_embeddings.weight") == 1
    Mano(groups)  # no duplicate-param error


def test_head_found_by_vocab_size_when_named_otherwise():
    model = TinyLM(head_name="decoder_out")  # not a known head name, but out_features == vocab
    assert "decoder_out.weight" in names(mano_param_groups(model), "adamw")


def test_patterns_override_and_options():
    model = TinyLM()
    groups = mano_param_groups(model, adamw_patterns=[r"\.wq\."], mano_patterns=[r"^lm_head\."],
                               adamw_options={"lr": 1e-4}, mano_options={"variant": "v1"})
    assert "lm_head.weight" in names(groups, "mano")
    assert "layers.0.wq.weight" in names(groups, "adamw")
    opt = Mano(groups, lr=1e-3)
    by_alg = {g["algorithm"]: g for g in opt.param_groups}
    assert by_alg["adamw"]["lr"] == 1e-4 and by_alg["mano"]["lr"] == 1e-3
    assert by_alg["mano"]["variant"] == "v1"
    with pytest.raises(ValueError, match="layers.0.w1.bias"):
        mano_param_groups(model, mano_patterns=[r"w1\.bias"])


def test_frozen_params_are_left_out():
    model = TinyLM()
    model.layers[0]["wq"].weight.requires_grad_(False)
    mano, adamw = classify_parameters(model)
    assert "layers.0.wq.weight" not in [n for n, _ in mano + adamw]


def test_trains_a_model_end_to_end():
    torch.manual_seed(0)
    model = TinyLM(vocab=20, dim=16)
    opt = Mano(mano_param_groups(model), lr=1e-2)
    x = torch.randint(0, 20, (64,))

    def loss_fn():
        h = model.tok_embeddings(x)
        for layer in model.layers:
            h = layer["norm"](h + layer["wq"](h))
        return nn.functional.cross_entropy(model.lm_head(h), (x + 1) % 20)

    first = loss_fn().item()
    for _ in range(60):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        step_and_check_mano_matrices(opt)  # the matrices moved as Mano moves them, every step
    assert loss.item() < 0.5 * first
