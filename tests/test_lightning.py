"""Mano through PyTorch Lightning's ``ModelParallelStrategy`` (FSDP2), 2 gloo ranks, and the
strategies it cannot run under (``FSDPStrategy``: FSDP1 flat shards; ``DeepSpeedStrategy``).

The ranks run Lightning's own ``Trainer(accelerator="cpu", devices=2, strategy=
ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1))``, unpatched (see
``tests/lightning_harness.py``): ``configure_model`` calls ``fully_shard``, ``configure_optimizers``
returns :func:`mano_dist.integrations.lightning.mano_optimizer`, Lightning's DistributedSampler
splits each global batch, and ``trainer.save_checkpoint`` / ``fit(ckpt_path=...)`` save and load
(DCP shards, or one full file). Reference: plain Mano on the unsharded model and the global batch
in one process.

Needs ``mano-dist[lightning]`` (pytorch-lightning 2.6.6; the DeepSpeed test also ``[deepspeed]``).
Lightning is imported inside the tests (not at collection, which every pytest run pays for);
a missing package fails them, never skips them (see tests/conftest.py).
"""

from __future__ import annotations

import pytest
import torch

from tests.dist import run_distributed
from tests.lightning_harness import (
    counting_sequences, dataloader, deepspeed_strategy_on_cpu_ranks, full_params, lightning_classes, lm_loss,
    set_rank_env, tiny_lm,
)

WORLD, MICRO, STEPS_PER_EPOCH, EPOCHS, LR = 2, 2, 2, 2, 0.02
SAMPLES = WORLD * MICRO * STEPS_PER_EPOCH
MANO = {"lr": LR, "variant": "v2", "weight_decay": 0.05}
ENV = {"OMP_NUM_THREADS": "1"}


def _trainer(epochs, **strategy_kwargs):
    import pytorch_lightning as pl
    from pytorch_lightning.strategies import ModelParallelStrategy

    strategy = ModelParallelStrategy(data_parallel_size=WORLD, tensor_parallel_size=1, **strategy_kwargs)
    return pl.Trainer(accelerator="cpu", devices=WORLD, num_nodes=1, strategy=strategy, max_epochs=epochs,
                      logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0)


def _reference_params():
    """Plain Mano, one process, unsharded, each step on the global batch: what the ranks' micro
    batches cover together. Lightning gives a training dataloader a ``DistributedSampler(shuffle=
    True, seed=0)`` (whatever the dataloader's own sampler) and calls ``set_epoch`` every epoch."""
    from torch.utils.data import DistributedSampler

    from mano_dist import Mano, mano_param_groups

    model = tiny_lm()
    optimizer = Mano(mano_param_groups(model), **MANO)
    tokens = counting_sequences(SAMPLES)
    out = []
    for epoch in range(EPOCHS):
        samplers = [DistributedSampler(range(SAMPLES), WORLD, rank, shuffle=True, seed=0) for rank in range(WORLD)]
        for sampler in samplers:
            sampler.set_epoch(epoch)  # what Lightning's fit loop calls
        per_rank = [list(sampler) for sampler in samplers]
        for step in range(STEPS_PER_EPOCH):
            batch = [i for indices in per_rank for i in indices[step * MICRO:(step + 1) * MICRO]]
            lm_loss(model, tokens[batch]).backward()
            optimizer.step()
            optimizer.zero_grad()
            out.append({n: p.detach().clone() for n, p in model.named_parameters()})
    return out


def _body(rank, world_size, ckpt_root):
    set_rank_env(rank, world_size)
    ManoLM, Recorder = lightning_classes()
    from torch.distributed.tensor import DTensor

    from mano_dist import Mano

    out = {}
    # Uninterrupted: EPOCHS epochs.
    module, recorder = ManoLM(**MANO), Recorder()
    trainer = _trainer(EPOCHS)
    trainer.callbacks.append(recorder)
    trainer.fit(module, dataloader(SAMPLES, MICRO))
    optimizer = trainer.optimizers[0]
    out["params"] = recorder.params
    out["sharded"] = all(isinstance(p, DTensor) for p in module.parameters())
    out["routing"] = {n: g["algorithm"] for g in optimizer.param_groups for n in g["param_names"]}
    out["is_mano"] = isinstance(optimizer, Mano)
    out["process_group"] = str(trainer.strategy.process_group_backend)

    # Interrupted at the epoch boundary, sharded (DCP) and full checkpoints, then resumed.
    for kind, distributed in (("sharded", True), ("full", False)):
        path = f"{ckpt_root}/{kind}.ckpt"
        first = _trainer(1, save_distributed_checkpoint=distributed)
        first.fit(ManoLM(**MANO), dataloader(SAMPLES, MICRO))
        first.save_checkpoint(path)
        resumed, recorder = ManoLM(seed=1, **MANO), Recorder()
        second = _trainer(EPOCHS, save_distributed_checkpoint=distributed)
        second.callbacks.append(recorder)
        second.fit(resumed, dataloader(SAMPLES, MICRO), ckpt_path=path)
        out[kind] = {"params": recorder.params, "global_step": second.global_step}
    return out


@pytest.mark.distributed
def test_model_parallel_strategy_matches_one_process_and_resumes(tmp_path):
    results = run_distributed(_body, WORLD, tmp_path, str(tmp_path), env=ENV, timeout=240)
    reference = _reference_params()
    first = results[0]
    assert first["sharded"] and first["is_mano"] and first["process_group"] == "gloo"
    for name, algorithm in first["routing"].items():
        hidden = ".blocks." in name and (".up." in name or ".down." in name)
        assert algorithm == ("mano" if hidden else "adamw"), name
    assert len(first["params"]) == EPOCHS * STEPS_PER_EPOCH
    for result in results:
        for got, want in zip(result["params"], reference):
            assert set(got) == set(want)
            for name in want:
                torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)
    assert max((first["params"][-1][n] - tiny_lm().state_dict()[n]).abs().max().item()
               for n in reference[-1]) > 1e-3  # it trained

    for kind in ("sharded", "full"):
        for result in results:
            resumed = result[kind]
            assert resumed["global_step"] == EPOCHS * STEPS_PER_EPOCH
            assert len(resumed["params"]) == (EPOCHS - 1) * STEPS_PER_EPOCH  # only the second epoch ran
            for got, want in zip(resumed["params"], result["params"][STEPS_PER_EPOCH:]):
                for name in want:  # bit-exact: the same ranks, the same sums
                    assert torch.equal(got[name], want[name]), (kind, name)


# ------------------------------------------------------------------ FSDPStrategy (FSDP1)
def _fsdp1_views(module):
    """What FSDP1 (``use_orig_params=True``, Lightning's default) leaves in the module when
    ``configure_optimizers`` runs: every param a 1-D view of this rank's piece of a flat shard.
    (FSDP1 itself refuses CPU devices in torch 2.13, and Lightning refuses FSDPStrategy without
    CUDA, so the layout is reproduced here.)"""
    for sub in module.modules():
        for name, p in list(sub.named_parameters(recurse=False)):
            setattr(sub, name, torch.nn.Parameter(p.detach().reshape(-1)[: (p.numel() + 1) // 2].clone()))
    return module


def test_fsdp_strategy_is_refused_with_the_fix_named():
    from types import SimpleNamespace

    from pytorch_lightning.strategies import FSDPStrategy

    from mano_dist import Mano, mano_param_groups
    from mano_dist.integrations.lightning import mano_optimizer

    ManoLM, _ = lightning_classes()
    # Attached to a Trainer whose strategy is FSDPStrategy: refused before any param is read.
    module = ManoLM()
    module._trainer = SimpleNamespace(strategy=FSDPStrategy())
    with pytest.raises(ValueError, match=r"FSDPStrategy.*ModelParallelStrategy"):
        mano_optimizer(module, lr=LR)
    # Not attached (e.g. a subclass of FSDPStrategy, or a module built by hand): the flat views
    # themselves are recognised.
    module = _fsdp1_views(ManoLM())
    with pytest.raises(ValueError, match=r"ModelParallelStrategy.*fully_shard") as error:
        mano_optimizer(module, lr=LR)
    assert "blocks.0.up.weight" in str(error.value) or "embed.weight" in str(error.value)
    # Why the check: without it, the name routing sees only 1-D params and Mano would train
    # everything with its AdamW fallback, silently.
    assert {g["algorithm"] for g in Mano(mano_param_groups(module), lr=LR).param_groups} == {"adamw"}
    # Unsharded and under ModelParallelStrategy nothing is refused.
    assert {g["algorithm"] for g in mano_optimizer(ManoLM(), lr=LR).param_groups} == {"mano", "adamw"}


# ------------------------------------------------------------------ DeepSpeedStrategy
DS_STEPS = 2


def _ds_config(json_optimizer: bool):
    cfg = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": 1,
           "train_batch_size": MICRO * WORLD, "gradient_clipping": 0.0, "steps_per_print": 10**9,
           "zero_optimization": {"stage": 2}}
    if json_optimizer:
        cfg["optimizer"] = {"type": "Mano", "params": dict(MANO)}
    return cfg


def _deepspeed_body(rank, world_size):
    """Lightning's ``DeepSpeedStrategy._setup_model_and_optimizer`` (its one call of
    ``deepspeed.initialize``: the LightningModule, ``filter(requires_grad, parameters())``, the
    optimizer from ``configure_optimizers`` or None) run on CPU ranks. The Trainer itself cannot
    start it here: ``DeepSpeedStrategy.setup_environment`` refuses any accelerator but CUDA; and
    the strategy needs indexed devices (``deepspeed_strategy_on_cpu_ranks``)."""
    set_rank_env(rank, world_size)
    import pytorch_lightning as pl
    from pytorch_lightning.strategies import DeepSpeedStrategy

    import mano_dist.deepspeed  # noqa: F401  registers "type": "Mano" (the "json" run)
    from mano_dist import Mano, mano_param_groups
    from mano_dist.integrations.lightning import mano_optimizer

    ManoLM, _ = lightning_classes()
    tokens = counting_sequences(WORLD * MICRO * DS_STEPS)
    out = {}
    for label in ("helper", "json"):
        trainer = pl.Trainer(accelerator="cpu", devices=world_size, strategy=DeepSpeedStrategy(
            config=_ds_config(label == "json")), logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False)
        deepspeed_strategy_on_cpu_ranks(trainer.strategy, world_size)
        module = ManoLM()
        module.trainer = trainer
        optimizer = mano_optimizer(module, **MANO) if label == "helper" else None
        engine, _ = trainer.strategy._setup_model_and_optimizer(module, optimizer)
        basic = engine.basic_optimizer
        out[label] = {"type": type(basic).__name__, "zero_stage": engine.zero_optimization_stage(),
                      "routing": {n: g["algorithm"] for g in basic.param_groups for n in g["param_names"]}}
        for step in range(DS_STEPS):
            batch = tokens[(step * WORLD + rank) * MICRO:(step * WORLD + rank + 1) * MICRO]
            engine.backward(lm_loss(module.model, batch))
            engine.step()
        out[label]["params"] = full_params(module.model)
    # ZeRO-3 under Lightning (deepspeed.zero.Init around configure_model): params are (0,)-shaped
    # with their true shape in ds_shape when configure_optimizers runs; that is not FSDP1.
    from mano_dist.integrations.lightning import check_strategy

    zero3 = ManoLM()
    for sub in zero3.modules():
        for name, p in list(sub.named_parameters(recurse=False)):
            empty = torch.nn.Parameter(torch.empty(0))
            empty.ds_shape = p.shape
            setattr(sub, name, empty)
    zero3.trainer = trainer
    out["zero3_kind"] = check_strategy(zero3)
    zero3.trainer = None
    out["zero3_detached_kind"] = check_strategy(zero3)
    # A plain Mano (not DeepSpeedMano) under ZeRO >= 1 is refused by name.
    trainer = pl.Trainer(accelerator="cpu", devices=world_size, strategy=DeepSpeedStrategy(
        config=_ds_config(False)), logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False)
    deepspeed_strategy_on_cpu_ranks(trainer.strategy, world_size)
    module = ManoLM()
    try:
        trainer.strategy._setup_model_and_optimizer(module, Mano(mano_param_groups(module), **MANO))
        out["plain"] = None
    except ValueError as e:
        out["plain"] = str(e)
    return out


@pytest.mark.distributed
@pytest.mark.deepspeed
@pytest.mark.slow
def test_deepspeed_strategy_gets_deepspeed_mano_routed_by_name(tmp_path):
    results = run_distributed(_deepspeed_body, WORLD, tmp_path, env={**ENV, "DS_ACCELERATOR": "cpu"}, timeout=300)
    from mano_dist import Mano, mano_param_groups

    model = tiny_lm()
    optimizer = Mano(mano_param_groups(model), **MANO)
    tokens = counting_sequences(WORLD * MICRO * DS_STEPS)
    for step in range(DS_STEPS):
        lm_loss(model, tokens[step * WORLD * MICRO:(step + 1) * WORLD * MICRO]).backward()
        optimizer.step()
        optimizer.zero_grad()
    want = {n: g["algorithm"] for g in optimizer.param_groups for n in g["param_names"]}
    for result in results:
        for label in ("helper", "json"):
            run = result[label]
            assert run["type"] == "DeepSpeedMano" and run["zero_stage"] == 2, label
            assert {n.removeprefix("model."): a for n, a in run["routing"].items()} == want, label
            for name, p in model.named_parameters():
                torch.testing.assert_close(run["params"][name], p.detach(), rtol=1e-5, atol=1e-6,
                                           msg=f"{label} {name}")
        assert "DeepSpeedMano" in result["plain"] and "ZeRO stage 2" in result["plain"]
        assert result["zero3_kind"] == "deepspeed" and result["zero3_detached_kind"] is None
