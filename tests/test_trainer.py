"""The trainer's scale features, each against the run it must equal:

- lean init: the weights ``build_model`` materialises shard by shard are the same bits at world
  sizes 1, 2, 4 and dp 2 x tp 2, and equal the per-parameter draw written out here;
- micro-batches: 1 sequence x 4 accumulation steps equals 4 x 1 (FSDP2 and DeepSpeed ZeRO-2),
  and a run with accumulation killed mid-way resumes bit for bit;
- activation checkpointing: the same losses as without;
- bf16 mixed precision (FSDP2 policy): trains, checkpoints fp32 masters, reshards 2 -> 1;
- compile (with checkpointing and micro-batches): the same losses as eager;
- DeepSpeed batch keys and ``[optim]``: honoured, or a conflict refused, before any collective;
- metrics: ETA, MFU's FLOP count and the TensorBoard scalars.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist import run_distributed
from test_recipe import ROOT, SMALL, assert_same_run, ds_json, final_params, losses, straight, torchrun  # noqa: F401

TINY_INIT = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.ffn_dim=172", "data.seq_len=64"]


def _config(*overrides):
    from launch.config import load_config

    return load_config(ROOT / "configs" / "llama_tiny.toml", [*TINY_INIT, *overrides])


def _initial_weights(rank, world_size, tp, checkpoint):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from launch.model import build_model
    from launch.parallel import build_mesh

    cfg = _config(f"parallel.tp={tp}", f"train.activation_checkpoint={checkpoint}")
    model = build_model(cfg, build_mesh(torch.device("cpu"), world_size, tp), torch.device("cpu"))
    assert all(hasattr(p, "device_mesh") for p in model.parameters())  # sharded, not full copies
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return full if rank == 0 else None


@pytest.mark.slow
@pytest.mark.distributed
def test_lean_init_is_bit_identical_at_every_world_size_and_tp(tmp_path):
    from launch.model import Llama, RMSNorm, build_model, parameter_seed

    one = build_model(_config(), None, torch.device("cpu")).state_dict()
    # The reference, from the definition: each parameter its own Normal(0, 0.02) draw seeded by
    # (train.seed, name), norm gains ones.
    with torch.device("meta"):
        meta = Llama(_config().model)
    for name, module in meta.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            key = f"{name}.{p_name}"
            if isinstance(module, RMSNorm):
                want = torch.ones(p.shape)
            else:
                g = torch.Generator().manual_seed(parameter_seed(0, key))
                want = torch.empty(p.shape).normal_(0, 0.02, generator=g)
            assert torch.equal(one[key], want), key
    for world_size, tp, checkpoint in ((2, 1, "none"), (4, 1, "none"), (4, 2, "full")):
        got = run_distributed(_initial_weights, world_size, tmp_path, tp, checkpoint)[0]
        assert got.keys() == {k for k in one if "rope" not in k}, (world_size, tp)
        for k in got:
            assert torch.equal(got[k], one[k]), (world_size, tp, k)


def _run(out, *extra, crash=(), launcher=("--standalone", "--nproc-per-node", "2"), env=None):
    proc = torchrun(out, *extra, crash=crash, launcher=launcher, env=env)
    output = proc.communicate(timeout=600)[0]
    return proc.returncode, output


def _ok(out, *extra, **kw):
    code, output = _run(out, *extra, **kw)
    assert code == 0, output
    return output


def _close(a: dict, b: dict, tol: float):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=tol, msg=k)


def _model_params(out, step):
    p = final_params(out, step)
    return p.get("model", p)


@pytest.mark.slow
@pytest.mark.distributed
def test_accumulation_equals_large_batch_and_resumes_bit_for_bit(tmp_path, straight):
    """FSDP2, 2 ranks, fp32: micro-batch 1 x 4 accumulation steps gives the losses and, at the
    step-3 checkpoint, the parameters of micro-batch 4 x 1 (the ``straight`` run) to 1e-5; the
    same run killed after step 5 resumes from step 3 to the same losses and parameters, bit for
    bit."""
    micro = ("--resume", "none", "--set", "train.micro_batch=1")
    whole = _ok(tmp_path / "whole", *micro)
    assert "micro-batch 1 x 4 accumulation" in whole, whole
    ref, got = losses(straight[0]), losses(tmp_path / "whole")
    assert all(abs(ref[k] - got[k]) < 1e-5 for k in range(1, 4)), (ref, got)
    _close(_model_params(tmp_path / "whole", 3), _model_params(straight[0], 3), 1e-5)

    code, output = _run(tmp_path / "cut", *micro, crash=(5,))
    assert code != 0, output
    output = _ok(tmp_path / "cut", "--resume", "auto", "--set", "train.micro_batch=1")
    assert "at step 3" in output, output
    assert_same_run(tmp_path / "whole", tmp_path / "cut")


def _ds_params(out, step):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(Path(out) / "ds_checkpoints"), tag=f"step-{step}")


@pytest.mark.slow
@pytest.mark.deepspeed
@pytest.mark.distributed
def test_deepspeed_accumulation_from_the_json_equals_large_batch(tmp_path):
    """ZeRO-2, 2 ranks, fp32, 3 steps: the JSON's micro-batch 1 (gradient_accumulation_steps
    derived: 4) gives the losses and parameters of micro-batch 4 to 1e-5."""
    env = {"DS_ACCELERATOR": "cpu"}
    three = ("--resume", "none", "--engine", "deepspeed", "--set", "train.steps=3")
    big = _ok(tmp_path / "big", *three, "--ds-config", str(ds_json(tmp_path, 2)), env=env)
    small = _ok(tmp_path / "small", *three, "--ds-config",
                str(ds_json(tmp_path, 2, train_micro_batch_size_per_gpu=1)), env=env)
    assert "micro-batch 4 x 1 accumulation" in big and "micro-batch 1 x 4 accumulation" in small, (big, small)
    assert "gradient_accumulation_steps = 4 (from train.*)" in small, small
    a, b = losses(tmp_path / "big"), losses(tmp_path / "small")
    assert a.keys() == b.keys() == {1, 2, 3} and all(abs(a[k] - b[k]) < 1e-5 for k in a), (a, b)
    _close(_ds_params(tmp_path / "small", 3), _ds_params(tmp_path / "big", 3), 1e-5)


@pytest.mark.distributed
def test_activation_checkpointing_gives_the_same_losses(tmp_path, straight):
    """Per-block recompute in the backward (FSDP2, 2 ranks, fp32): losses as without, to 1e-6."""
    _ok(tmp_path, "--resume", "none", "--set", "train.steps=3", "--set", "train.activation_checkpoint=full")
    ref, got = losses(straight[0]), losses(tmp_path)
    assert got.keys() == {1, 2, 3} and all(abs(ref[k] - got[k]) < 1e-6 for k in got), (ref, got)


@pytest.mark.slow
@pytest.mark.distributed
def test_bf16_mixed_precision_trains_checkpoints_fp32_masters_and_reshards(tmp_path, straight):
    """FSDP2 MixedPrecisionPolicy(bf16 params, fp32 reduce), 2 ranks: the loss falls as in fp32
    (within 0.05 of the fp32 run at every step), the checkpoint holds fp32 master weights and
    fp32 Mano state, and one process resumes from the 2-rank step-9 checkpoint to a step-10
    loss within 0.05 of the 2-rank run's."""
    out = tmp_path / "two"
    _ok(out, "--resume", "none", "--set", "train.mixed_precision=bf16")
    ref, got = losses(straight[0]), losses(out)
    assert got[10] < got[1] - 0.5, got
    assert all(abs(ref[k] - got[k]) < 0.05 for k in got), (ref, got)
    from mano_dist.checkpoint import consolidate

    state = consolidate(out / "checkpoints" / "step-10", tmp_path / "full.pt")
    assert {v.dtype for v in state["model"].values()} == {torch.float32}
    moments = [v for per_param in state["optim"]["state"].values() for v in per_param.values()
               if isinstance(v, torch.Tensor) and v.ndim >= 1]
    assert moments and {v.dtype for v in moments} == {torch.float32}

    one = tmp_path / "one"
    shutil.copytree(out / "checkpoints" / "step-9", one / "checkpoints" / "step-9")
    cmd = [sys.executable, "-m", "launch.train", "--config", "configs/llama_tiny.toml", "--out-dir", str(one),
           *SMALL, "--set", "train.mixed_precision=bf16", "--resume", "auto"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "at step 9" in proc.stdout, proc.stdout
    assert abs(losses(one)[10] - got[10]) < 0.05, (losses(one), got)


@pytest.mark.slow
@pytest.mark.distributed
def test_compiled_checkpointed_micro_batched_blocks_match_eager(tmp_path, straight):
    """Every switch of ``parallelize`` at once, in torchtitan's order (checkpoint, compile with
    inductor on CPU, FSDP2), with micro-batches of 2: the eager whole-batch run's losses to 1e-5."""
    _ok(tmp_path, "--resume", "none", "--set", "train.steps=3", "--set", "train.compile=true",
        "--set", "train.activation_checkpoint=full", "--set", "train.micro_batch=2")
    ref, got = losses(straight[0]), losses(tmp_path)
    assert got.keys() == {1, 2, 3} and all(abs(ref[k] - got[k]) < 1e-5 for k in got), (ref, got)


def test_metrics_eta_mfu_and_tensorboard(tmp_path):
    """One process, 2 steps: every JSONL record has an ETA, and TensorBoard holds the same
    loss scalars. MFU's FLOPs per token: 6 x (weights that multiply) + 12 x layers x dim x seq."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from launch.metrics import flops_per_token, peak_bf16_flops

    cmd = [sys.executable, "-m", "launch.train", "--config", "configs/llama_tiny.toml", "--out-dir", str(tmp_path),
           *SMALL, "--set", "train.steps=2", "--set", "train.tensorboard=true", "--resume", "none"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert " eta 0:00:" in proc.stdout and "  mfu " not in proc.stdout  # MFU on CUDA only
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2] and recs[-1]["eta_s"] == 0 and recs[0]["eta_s"] > 0
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    scalars = events.Scalars("train/loss")
    assert [s.step for s in scalars] == [1, 2]
    assert [s.value for s in scalars] == pytest.approx([r["loss"] for r in recs], rel=1e-6)

    m = _config().model  # dim 64, 2 layers, ffn 172, vocab 4096
    n = 2 * (4 * 64 * 64 + 3 * 64 * 172 + 2 * 64) + 64 + 2 * 4096 * 64
    assert flops_per_token(m, n, 64) == 6 * (n - 4096 * 64) + 12 * 2 * 64 * 64
    assert peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_bf16_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_bf16_flops("NVIDIA A100-SXM4-80GB") == 312e12 and peak_bf16_flops("Tesla T4") is None


# DeepSpeed JSON vs train.* / [optim]: resolved before any process group, as a pure function.
@pytest.mark.parametrize("json_keys,overrides,expect", [
    ({}, [], (4, 1)),                                      # derived from train.*
    ({"train_micro_batch_size_per_gpu": 2}, [], (2, 2)),   # the JSON's micro-batch honoured
    ({"gradient_accumulation_steps": 4}, [], (1, 4)),      # ... or its accumulation
    ({"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "train_batch_size": 8},
     ["train.micro_batch=2"], (2, 2)),                     # all agree
    ({"train_micro_batch_size_per_gpu": 8}, [], "does not divide the 4 sequences per rank"),
    ({"gradient_accumulation_steps": 1}, ["train.micro_batch=1"], "gradient_accumulation_steps = 1 (the run needs 4)"),
    ({"train_batch_size": 16}, [], "train_batch_size = 16 (the run needs 8)"),
])
def test_deepspeed_batch_keys_are_honoured_or_refused(tmp_path, json_keys, overrides, expect):
    from launch.config import ConfigError
    from launch.engines import deepspeed_config

    cfg = _config("train.global_batch=8", "parallel.engine=deepspeed",
                  f"parallel.ds_config={ds_json(tmp_path, 2, **json_keys)}", *overrides)
    if isinstance(expect, str):
        with pytest.raises(ConfigError, match=expect.replace("(", r"\(").replace(")", r"\)")):
            deepspeed_config(cfg, 2)
        return
    ds, _ = deepspeed_config(cfg, 2)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) \
        == (*expect, 8)


def test_deepspeed_optimizer_follows_optim_or_refuses(tmp_path):
    from launch.config import ConfigError
    from launch.engines import deepspeed_config, describe_optimizer

    zero2 = f"parallel.ds_config={ROOT / 'configs' / 'ds_zero2.json'}"
    base = ("train.global_batch=16", "parallel.engine=deepspeed", zero2)
    ds, notes = deepspeed_config(_config(*base, "optim.momentum=0.9", "optim.lr=0.005"), 2)
    assert ds["optimizer"]["type"] == "Mano"
    assert ds["optimizer"]["params"]["momentum"] == 0.9 and ds["optimizer"]["params"]["lr"] == 0.005
    assert "optimizer.params.momentum 0.95 -> 0.9 (from [optim])" in notes
    assert "Mano (lr=0.005, " in describe_optimizer(ds)
    with pytest.raises(ConfigError, match="names optimizer 'Mano' but optim.name = 'adamw'"):
        deepspeed_config(_config(*base, "optim.name=adamw"), 2)
    with pytest.raises(ConfigError, match="optim.adamw_lr is not supported"):
        deepspeed_config(_config(*base, "optim.adamw_lr=0.001"), 2)
    with pytest.raises(ConfigError, match='"bf16": {"enabled": true}'):
        deepspeed_config(_config(*base, "train.mixed_precision=bf16"), 2)
    bf16 = f"parallel.ds_config={ROOT / 'configs' / 'ds_bf16.json'}"
    assert deepspeed_config(_config("train.global_batch=16", "parallel.engine=deepspeed", bf16,
                                    "train.mixed_precision=bf16"), 2)[0]["bf16"]["enabled"]
    no_optimizer = ds_json(tmp_path, 2)
    data = json.loads(no_optimizer.read_text())
    del data["optimizer"]
    no_optimizer.write_text(json.dumps(data))
    ds, _ = deepspeed_config(_config("train.global_batch=16", "parallel.engine=deepspeed",
                                     f"parallel.ds_config={no_optimizer}", "optim.name=adamw"), 2)
    assert ds["optimizer"] == {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.1, "betas": [0.9, 0.95]}}
