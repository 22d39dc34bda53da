"""Mano in the Transformers Trainer, one process, as users run it (real Trainer, tiny random-init
LlamaForCausalLM on CPU): routing by name, falling loss, bit-exact resume; and the errors for
combinations that cannot work. The FSDP2 and DeepSpeed paths are in test_integrations_dist.py.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from mano_dist import Mano
from mano_dist.integrations import ManoFactory
from tests.integrations_harness import CountingDataset, reset_accelerate_state, tiny_llama

HIDDEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _trainer(out_dir, max_steps, *, optimizer_cls_and_kwargs=None, weight_decay=0.05, **extra):
    from transformers import Trainer, TrainingArguments

    reset_accelerate_state()
    args = TrainingArguments(
        output_dir=str(out_dir), max_steps=max_steps, per_device_train_batch_size=4, learning_rate=0.02,
        weight_decay=weight_decay, lr_scheduler_type="constant", logging_steps=1, report_to=[],
        use_cpu=True, seed=0, disable_tqdm=True, train_sampling_strategy="sequential", **extra,
    )
    kwargs = optimizer_cls_and_kwargs or ManoFactory.from_args(args, variant="v2")
    return Trainer(model=tiny_llama(), args=args, train_dataset=CountingDataset(), optimizer_cls_and_kwargs=kwargs)


def _params(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def test_trainer_routes_trains_and_resumes_bit_exactly(tmp_path):
    trainer = _trainer(tmp_path / "a", 20, save_strategy="steps", save_steps=10)
    trainer.train()

    routing = {}
    for group in trainer.optimizer.param_groups:
        for name in group["param_names"]:
            routing[name] = (group["algorithm"], group["weight_decay"])
    names = dict(trainer.model.named_parameters())
    assert set(routing) == set(names)
    for name, (algorithm, weight_decay) in routing.items():
        if any(h in name for h in HIDDEN):
            assert (algorithm, weight_decay) == ("mano", 0.05), name
        elif "norm" in name:
            assert (algorithm, weight_decay) == ("adamw", 0.0), name
        else:
            assert name in ("model.embed_tokens.weight", "lm_head.weight"), name
            assert (algorithm, weight_decay) == ("adamw", 0.05), name
    assert sum(a == "mano" for a, _ in routing.values()) == 14

    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 20
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3, losses
    final = _params(trainer)

    resumed = _trainer(tmp_path / "b", 20)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-10"))
    assert resumed.state.global_step == 20
    for name, p in _params(resumed).items():
        assert torch.equal(p, final[name]), name


def test_trainer_with_the_mano_class_says_to_use_the_factory(tmp_path):
    """The Trainer's own grouping (by weight decay, norms included) cannot feed Mano."""
    trainer = _trainer(tmp_path, 1, optimizer_cls_and_kwargs=(Mano, {"lr": 0.02}))
    with pytest.raises(ValueError, match="ManoFactory"):
        trainer.create_optimizer()


def test_factory_honours_plain_kwargs_and_routing_patterns():
    model = tiny_llama()
    optimizer = ManoFactory()(model, lr=0.01, weight_decay=0.2, variant="v1",
                              adamw_patterns=[r"layers\.1\.mlp"])
    by_name = {n: g for g in optimizer.param_groups for n in g["param_names"]}
    assert by_name["model.layers.0.mlp.up_proj.weight"]["algorithm"] == "mano"
    assert by_name["model.layers.1.mlp.up_proj.weight"]["algorithm"] == "adamw"
    assert by_name["model.layers.0.self_attn.q_proj.weight"]["weight_decay"] == 0.2
    assert by_name["model.norm.weight"]["weight_decay"] == 0.0
    assert {g["variant"] for g in optimizer.param_groups} == {"v1"}
    assert {g["lr"] for g in optimizer.param_groups} == {0.01}


def test_swapped_params_get_fresh_local_state_and_stale_state_is_dropped():
    """What Accelerate's FSDP2 preparation does to a param group, on plain tensors."""
    w = torch.nn.Parameter(torch.randn(6, 4))
    optimizer = Mano([w], lr=0.1)
    new = torch.nn.Parameter(w.detach()[:3].clone())  # a "shard"
    optimizer.param_groups[0]["params"] = [new]
    # state_dict() before any step (what a checkpoint right after prepare() sees) re-binds too.
    assert optimizer.state_dict()["state"][0]["momentum_buffer"].shape == (3, 4)
    assert list(optimizer.state) == [new]
    new.grad = torch.ones_like(new)
    optimizer.step()
    assert list(optimizer.state) == [new]
    assert optimizer.state[new]["momentum_buffer"].shape == (3, 4)
    assert set(optimizer.state_dict()["state"]) == {0}

    # After a step the momentum cannot follow a swap: a clear error, nothing changed.
    optimizer.param_groups[0]["params"] = [w]
    w.grad = torch.ones_like(w)
    before = w.detach().clone()
    with pytest.raises(RuntimeError, match="replaced .* after 1 optimizer steps"):
        optimizer.step()
    assert torch.equal(w, before)


def test_import_mano_dist_stays_light():
    code = ("import sys, mano_dist, mano_dist.integrations; "
            "print(sorted(m for m in ('transformers', 'accelerate', 'deepspeed') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_flattened_params_swapped_into_a_mano_group_are_refused():
    """FSDP1-style flat shards: a clear error at the next step, before any collective."""
    w = torch.nn.Parameter(torch.randn(6, 4))
    optimizer = Mano([w], lr=0.1)
    flat = torch.nn.Parameter(w.detach().reshape(-1)[:12].clone())
    optimizer.param_groups[0]["params"] = [flat]
    flat.grad = torch.ones_like(flat)
    with pytest.raises(ValueError, match="FSDP2"):
        optimizer.step()
    assert list(optimizer.state) == [w]
