"""Mano under Accelerate's FSDP2 and DeepSpeed paths, 2 gloo ranks, tiny random-init LLaMA.

Accelerate enables FSDP2 and DeepSpeed only on accelerator device types; on CPU each rank calls
``tests.integrations_harness.accelerate_treats_cpu_as_accelerator()``, which changes only
Accelerate's device detection. Everything else runs as on GPUs: ``Accelerator.prepare`` itself
(``_prepare_fsdp2``: placeholders, ``fully_shard``, ``fsdp2_switch_optimizer_parameters``, in its
order; ``_prepare_deepspeed``: ``deepspeed.initialize``), the Trainer's loop, ``save_state`` and
``load_state``. References: the single-process Trainer, a plain single-process Mano loop on the
global batch, and the plain DeepSpeed engine.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tests.dist import run_distributed
from tests.integrations_harness import (
    CountingDataset, accelerate_treats_cpu_as_accelerator, counting_sequences, full_params,
    reset_accelerate_state, set_rank_env, tiny_llama,
)

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

WORLD, MICRO, STEPS, LR = 2, 2, 3, 0.02
ENV = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
FSDP_CONFIG = {"fsdp_version": 2, "reshard_after_forward": True,
               "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}


def _recorder():
    """A TrainerCallback recording the full params after every step and the collectives issued
    inside ``optimizer.step()`` (between the Trainer's pre- and post-step callbacks)."""
    from transformers import TrainerCallback

    from mano_dist import CollectiveCounter

    class Recorder(TrainerCallback):
        def __init__(self):
            self.params, self.collectives, self.counter = [], [], None

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.model = model

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            self.counter = CollectiveCounter().__enter__()

        def on_optimizer_step(self, args, state, control, **kwargs):
            self.counter.__exit__(None, None, None)
            self.collectives.append([(c.kind, c.payload_bytes) for c in self.counter.calls])

        def on_step_end(self, args, state, control, model=None, **kwargs):
            self.params.append(full_params(model))

    return Recorder()


def _trainer(out_dir, batch, **extra):
    from transformers import Trainer, TrainingArguments

    from mano_dist.integrations import ManoFactory

    args = TrainingArguments(
        output_dir=str(out_dir), max_steps=STEPS, per_device_train_batch_size=batch, learning_rate=LR,
        weight_decay=0.05, lr_scheduler_type="constant", report_to=[], seed=0, disable_tqdm=True,
        save_strategy="no", train_sampling_strategy="sequential", **extra,
    )
    recorder = _recorder()
    optimizer = extra.get("deepspeed") is None or "optimizer" not in extra["deepspeed"]
    trainer = Trainer(model=tiny_llama(), args=args, train_dataset=CountingDataset(), callbacks=[recorder],
                      optimizer_cls_and_kwargs=ManoFactory.from_args(args, variant="v2") if optimizer else None)
    return trainer, recorder


def _max_error(got, want):
    return max((got[n] - want[n]).abs().max().item() for n in want)


# ------------------------------------------------------------------ Trainer + FSDP2
def _trainer_fsdp2_body(rank, world_size, out_dir):
    set_rank_env(rank, world_size)
    accelerate_treats_cpu_as_accelerator()
    trainer, recorder = _trainer(out_dir, MICRO, fsdp=True, fsdp_config=FSDP_CONFIG)
    trainer.train()
    from torch.distributed.tensor import DTensor

    sharded = all(isinstance(p, DTensor) for p in trainer.model.parameters())
    return {"params": recorder.params, "collectives": recorder.collectives, "sharded": sharded,
            "distributed_type": str(trainer.accelerator.distributed_type)}


def test_trainer_fsdp2_matches_one_process_and_sends_only_statistics(tmp_path):
    results = run_distributed(_trainer_fsdp2_body, WORLD, tmp_path, str(tmp_path / "fsdp"), env=ENV, timeout=300)

    reset_accelerate_state()
    reference, ref_recorder = _trainer(tmp_path / "one", MICRO * WORLD, use_cpu=True)
    reference.train()
    assert results[0]["distributed_type"] == "DistributedType.FSDP" and results[0]["sharded"]
    for step in range(STEPS):
        for result in results:
            assert _max_error(result["params"][step], ref_recorder.params[step]) < 1e-5, step
    assert _max_error(results[0]["params"][-1], tiny_llama().state_dict()) > 1e-3  # it trained

    # optimizer.step(): the non-finite flag (4 bytes) and, on the steps that normalise columns
    # (sharded by FSDP2's row split), three fp32 statistics per column of every Mano matrix in one
    # all-reduce; never a gather of a matrix.
    stats = 3 * 8 * sum(p.shape[1] for n, p in tiny_llama().named_parameters() if "proj" in n)  # float64
    # (Measured today: [4] and [4, 6144] bytes on alternate steps; the bound leaves room for
    # the flag to be fused or dropped.)
    for result in results:
        steps = [[b for _, b in calls] for calls in result["collectives"]]
        assert all(kind == "all_reduce" for calls in result["collectives"] for kind, _ in calls)
        assert all(sum(s) <= stats + 16 for s in steps), steps
        assert any(s and max(s) >= stats for s in steps), steps


# ------------------------------------------------------------------ an Accelerate loop with FSDP2
def _global_batch(step):
    """The samples the Trainer's sequential sampler gives step ``step`` (rank r: the r-th MICRO)."""
    return counting_sequences(len(CountingDataset()))[step * MICRO * WORLD:(step + 1) * MICRO * WORLD]


def _rank_batch(step, rank):
    return _global_batch(step)[rank * MICRO:(rank + 1) * MICRO]


def _reference_params():
    """Plain Mano on the unsharded model and the global batch, one process."""
    from mano_dist import Mano, mano_param_groups

    model = tiny_llama()
    optimizer = Mano(mano_param_groups(model), lr=LR, variant="v2")
    out = []
    for step in range(STEPS):
        tokens = _global_batch(step)
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        out.append({n: p.detach().clone() for n, p in model.named_parameters()})
    return out


def _accelerator():
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin

    reset_accelerate_state()
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, reshard_after_forward=True,
                                            auto_wrap_policy="transformer_based_wrap",
                                            transformer_cls_names_to_wrap=["LlamaDecoderLayer"])
    return Accelerator(fsdp_plugin=plugin)


def _loop(accelerator, model, optimizer, rank, steps, *, save_after=None, save_dir=None):
    out = []
    for step in steps:
        tokens = _rank_batch(step, rank)
        accelerator.backward(model(input_ids=tokens, labels=tokens).loss)
        optimizer.step()
        optimizer.zero_grad()
        out.append(full_params(model))
        if step == save_after:
            accelerator.save_state(save_dir)
    return out


def _accelerate_loop_body(rank, world_size, ckpt_dir):
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    from mano_dist import Mano, mano_param_groups

    set_rank_env(rank, world_size)
    accelerate_treats_cpu_as_accelerator()
    runs = {}

    # The documented order: optimizer on the unsharded model, then prepare(model, optimizer).
    accelerator = _accelerator()
    model = tiny_llama()
    optimizer = Mano(mano_param_groups(model), lr=LR, variant="v2")
    model, optimizer = accelerator.prepare(model, optimizer)
    runs["before"] = _loop(accelerator, model, optimizer, rank, range(STEPS), save_after=1, save_dir=ckpt_dir)
    # The state built on the full-size params was dropped at the first step; what is left is one
    # entry per sharded param, each tensor a shard (DTensor) or AdamW's scalar step count.
    params = {id(p) for p in model.parameters()}
    runs["state_sharded"] = {id(p) for p in optimizer.state} == params and all(
        hasattr(t, "to_local") for s in optimizer.state.values() for t in s.values() if t.ndim)

    # The other order: shard first (Accelerate's own FSDP2 wrapping), build Mano on DTensors.
    accelerator = _accelerator()
    model = fsdp2_prepare_model(accelerator, tiny_llama())
    optimizer = Mano(mano_param_groups(model), lr=LR, variant="v2")
    model, optimizer = accelerator.prepare(model, optimizer)
    runs["after"] = _loop(accelerator, model, optimizer, rank, range(STEPS))

    # Resume: a fresh model and optimizer, prepared, then load_state of the checkpoint at step 2.
    accelerator = _accelerator()
    model = tiny_llama(seed=1)
    optimizer = Mano(mano_param_groups(model), lr=LR, variant="v2")
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.load_state(ckpt_dir)
    runs["resumed"] = _loop(accelerator, model, optimizer, rank, range(2, STEPS))

    # FSDP1 flattens every param to 1-D: the factory refuses instead of routing all to AdamW.
    from torch.distributed.fsdp import FullyShardedDataParallel

    from mano_dist.integrations import ManoFactory

    try:
        ManoFactory()(FullyShardedDataParallel(tiny_llama(), device_id=torch.device("cpu")), lr=LR)
    except ValueError as e:
        runs["fsdp1_error"] = str(e)
    return runs


def test_accelerate_fsdp2_loop_both_orders_and_resume(tmp_path):
    results = run_distributed(_accelerate_loop_body, WORLD, tmp_path, str(tmp_path / "ckpt"), env=ENV, timeout=300)
    reference = _reference_params()
    for runs in results:
        assert runs["state_sharded"]
        for order in ("before", "after"):
            for step in range(STEPS):
                assert _max_error(runs[order][step], reference[step]) < 1e-5, (order, step)
        assert "FSDP2" in runs["fsdp1_error"]
        for name, p in runs["resumed"][0].items():
            assert torch.equal(p, runs["before"][2][name]), name


# ------------------------------------------------------------------ Trainer + DeepSpeed ZeRO-2
def _zero2_config(**optimizer_params):
    return {
        "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto", "gradient_clipping": "auto", "steps_per_print": 10**9,
        "zero_optimization": {"stage": 2},
        "optimizer": {"type": "Mano", "params": {"variant": "v2", **optimizer_params}},
    }


def _deepspeed_trainer_body(rank, world_size, out_dir):
    import deepspeed

    import mano_dist.deepspeed  # noqa: F401  registers "type": "Mano"

    set_rank_env(rank, world_size)
    accelerate_treats_cpu_as_accelerator()
    # "auto": the Trainer fills lr and weight decay from TrainingArguments.
    trainer, recorder = _trainer(out_dir, MICRO, deepspeed=_zero2_config(lr="auto", weight_decay="auto"))
    trainer.train()
    engine = trainer.model_wrapped
    trained = {"distributed_type": str(trainer.accelerator.distributed_type),
               "optimizer": type(engine.optimizer.optimizer).__name__, "zero_stage": engine.zero_optimization_stage(),
               "params": recorder.params}

    # No "optimizer" in the JSON: the Trainer calls ManoFactory, which builds DeepSpeedMano.
    reset_accelerate_state()
    config = _zero2_config()
    del config["optimizer"]
    trainer, recorder = _trainer(out_dir, MICRO, deepspeed=config)
    trainer.train()
    trained["factory_optimizer"] = type(trainer.model_wrapped.optimizer.optimizer).__name__
    trained["factory_params"] = recorder.params

    # The plain DeepSpeed engine, same config with the values the Trainer filled in; for the
    # factory path, the client DeepSpeedMano with the groups and TrainingArguments' Adam settings.
    from mano_dist.deepspeed import DeepSpeedMano
    from mano_dist.integrations import trainer_param_groups

    config = _zero2_config(lr=LR, weight_decay=0.05)
    config.update(train_micro_batch_size_per_gpu=MICRO, gradient_accumulation_steps=1,
                  train_batch_size=MICRO * world_size, gradient_clipping=1.0)
    # An Accelerate loop: DummyOptim stands for the JSON's optimizer.
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, DummyOptim

    reset_accelerate_state()
    accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=copy.deepcopy(config)))
    model = tiny_llama()
    model, optimizer = accelerator.prepare(model, DummyOptim(model.parameters()))
    trained["loop"] = []
    for step in range(STEPS):
        tokens = _rank_batch(step, rank)
        accelerator.backward(model(input_ids=tokens, labels=tokens).loss)
        optimizer.step()
        optimizer.zero_grad()
        trained["loop"].append(full_params(model.module))

    plain = {}
    for path in ("json", "factory"):
        model = tiny_llama()
        optimizer = None
        if path == "factory":
            config.pop("optimizer")
            optimizer = DeepSpeedMano(trainer_param_groups(model, 0.05), lr=LR, variant="v2",
                                      adamw_betas=(0.9, 0.999), adamw_eps=1e-8)
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                               optimizer=optimizer, config=config)
        plain[path] = []
        for step in range(STEPS):
            tokens = _rank_batch(step, rank)
            engine.backward(engine(input_ids=tokens, labels=tokens).loss)
            engine.step()
            plain[path].append(full_params(engine.module))
    return {**trained, "plain": plain}


@pytest.mark.deepspeed
def test_trainer_deepspeed_zero2_json_mano_matches_plain_engine(tmp_path):
    results = run_distributed(_deepspeed_trainer_body, WORLD, tmp_path, str(tmp_path / "ds"), env=ENV, timeout=300)
    for result in results:
        assert result["distributed_type"] == "DistributedType.DEEPSPEED"
        assert (result["optimizer"], result["zero_stage"]) == ("DeepSpeedMano", 2)
        for step in range(STEPS):
            assert _max_error(result["params"][step], result["plain"]["json"][step]) < 1e-5, step
            assert _max_error(result["loop"][step], result["plain"]["json"][step]) < 1e-5, step
            assert _max_error(result["factory_params"][step], result["plain"]["factory"][step]) < 1e-5, step
        assert result["factory_optimizer"] == "DeepSpeedMano"
        assert _max_error(result["params"][-1], tiny_llama().state_dict()) > 1e-3
