"""The trainer's scale features, each against the run it must equal:

- lean init: the weights ``build_model`` materialises shard by shard are the same bits at world
  sizes 1, 2, 4 and dp 2 x tp 2, and equal the per-parameter draw written out here;
- micro-batches: 1 sequence x 4 accumulation steps equals 4 x 1 (FSDP2 and DeepSpeed ZeRO-2),
  and a run with accumulation killed mid-way resumes bit for bit;
- activation checkpointing: the same losses as without;
- bf16 mixed precision (FSDP2 policy): trains, checkpoints fp32 masters, reshards 2 -> 1;
- compile (with checkpointing and micro-batches): the same losses as eager;
- DeepSpeed batch keys and ``[optim]``: honoured, or a conflict refused, before any collective;
- metrics: ETA, MFU's FLOP count and peak table, and the TensorBoard scalars;
- host reads: a step that does not log reads nothing on the host, a logging step reads once,
  and the records are those of a run that logs every step; gradient clipping on the device
  equals the host-side formula it replaced (FSDP2, and TP's two meshes, 2 ranks).
"""

from __future__ import annotations

import json
import math
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

    from launch.trainer.model import build_model
    from launch.trainer.parallel import build_mesh

    cfg = _config(f"parallel.tp={tp}", f"train.activation_checkpoint={checkpoint}")
    model = build_model(cfg, build_mesh(torch.device("cpu"), world_size, tp), torch.device("cpu"))
    assert all(hasattr(p, "device_mesh") for p in model.parameters())  # sharded, not full copies
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return full if rank == 0 else None


@pytest.mark.slow
@pytest.mark.distributed
def test_lean_init_is_bit_identical_at_every_world_size_and_tp(tmp_path):
    from launch.trainer.model import Llama, RMSNorm, build_model, parameter_seed

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

    from launch.trainer.metrics import flops_per_token, peak_bf16_flops

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


def test_mfu_peak_by_exact_device_name_and_dtype():
    """Whole name tokens, the most specific entry winning: "L40" is not "L4", "H20" not "H200";
    the China and Blackwell parts have peaks; fp32 runs are measured against fp32/tf32 peaks."""
    from launch.trainer.metrics import PEAK_FLOPS, compute_dtype, peak_flops

    assert peak_flops("NVIDIA L4") == 121e12
    assert peak_flops("NVIDIA L40") == 181.05e12 != peak_flops("NVIDIA L4")
    assert peak_flops("NVIDIA L40S") == 362.05e12
    assert peak_flops("NVIDIA H20") == 148e12 and peak_flops("NVIDIA H200") == 989e12
    for name in ("NVIDIA H800", "NVIDIA H800 PCIe", "NVIDIA H20", "NVIDIA GB200", "NVIDIA B200", "NVIDIA H200 NVL",
                 "NVIDIA H100 NVL", "NVIDIA GH200 480GB", "NVIDIA A100 80GB PCIe"):
        assert all(peak_flops(name, dtype) for dtype in ("bf16", "tf32", "fp32")), name
    assert peak_flops("NVIDIA H800 PCIe") == 756e12 and peak_flops("NVIDIA H800") == 989e12
    assert peak_flops("NVIDIA GB200") == 2500e12 and peak_flops("NVIDIA B200") == 2250e12
    assert peak_flops("NVIDIA A100-SXM4-40GB", "fp32") == 19.5e12
    assert peak_flops("NVIDIA A100-SXM4-40GB", "tf32") == 156e12
    assert peak_flops("NVIDIA A10G") == 70e12 and peak_flops("NVIDIA A10G", "fp32") is None
    assert peak_flops("NVIDIA GeForce RTX 4090") is None and peak_flops("AMD Instinct MI300X") is None
    for key, peaks in PEAK_FLOPS.items():  # every entry is reached by its own name, none shadowed
        assert all(peak_flops("NVIDIA " + " ".join(key), dtype) == v for dtype, v in peaks.items()), key
    assert compute_dtype(True) == "bf16"
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert compute_dtype(False) == "fp32"
        torch.set_float32_matmul_precision("high")
        assert compute_dtype(False) == "tf32"
    finally:
        torch.set_float32_matmul_precision(before)


class _HostReadsPerStep:
    """A trainer callback: the host reads that ``launch/`` code makes during each step, counted
    from the previous step's callback to this one's (so from the second step on). Reads inside
    ``mano_dist`` (the optimizer's own, being removed separately) are filtered out by site."""

    def __init__(self, steps: int):
        self.steps, self.counter, self.reads = steps, None, {}

    def __call__(self, trainer, done: int) -> None:
        from mano_dist.dispatch import DispatchCounter

        if self.counter is not None:
            self.counter.__exit__(None, None, None)
            self.reads[done] = [s for s in self.counter.host_read_sites if "/launch/" in s]
        self.counter = None
        if done < self.steps:
            self.counter = DispatchCounter()
            self.counter.__enter__()


def test_only_logging_steps_read_the_host_and_records_are_unchanged(tmp_path):
    """One process, 6 steps, logging every 3rd (evaluation and checkpoint at the last): steps 2,
    4 and 5 make no host read in the trainer's code (loss, gradient norm and optimizer time stay
    on the device); step 3 reads once, all pending steps together; and every step's record
    equals that of the same run logging every step."""
    from launch.trainer.loop import main

    every = ["--config", str(ROOT / "configs" / "llama_tiny.toml"), *SMALL, "--resume", "none",
             "--set", "train.steps=6", "--set", "train.eval_every=6", "--set", "train.checkpoint_every=6"]
    counter = _HostReadsPerStep(6)
    assert main([*every, "--out-dir", str(tmp_path / "third"), "--set", "train.log_every=3"], callbacks=[counter]) == 0
    reads = counter.reads
    assert reads.keys() == {2, 3, 4, 5, 6}
    assert reads[2] == reads[4] == reads[5] == [], reads
    assert len(reads[3]) == 1 and "Tensor.tolist at" in reads[3][0] and "launch/trainer/loop.py" in reads[3][0], reads
    assert reads[6] and all("launch/trainer/loop.py" in site for site in reads[6]), reads  # + evaluation's one read

    assert main([*every, "--out-dir", str(tmp_path / "all"), "--set", "train.log_every=1"]) == 0
    third, all_ = ([json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
                   for d in ("third", "all"))
    assert [r["step"] for r in third] == [r["step"] for r in all_] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(third, all_):
        keys = ("loss", "grad_norm", "lr", "tokens")
        assert {k: a[k] for k in keys} == {k: b[k] for k in keys}, (a, b)
        assert a["opt_step_s"] > 0 and math.isfinite(a["grad_norm"])
    assert third[-1]["val_loss"] == all_[-1]["val_loss"]


def test_deepspeed_engine_step_leaves_the_gradient_norm_unread():
    """DeepSpeed's norm comes back as DeepSpeed holds it (a tensor here), read by no one."""
    from launch.trainer.engines import DeepSpeedEngine
    from mano_dist.dispatch import DispatchCounter

    class FakeEngine:
        device = torch.device("cpu")

        def step(self):
            self.norm = torch.ones(()) * 2

        def get_global_grad_norm(self):
            return self.norm

    engine = DeepSpeedEngine.__new__(DeepSpeedEngine)
    engine.engine = FakeEngine()
    with DispatchCounter() as dc:
        norm, stopwatch = engine.step(None)
    assert dc.host_reads == 0 and torch.is_tensor(norm) and float(norm) == 2.0 and stopwatch.seconds() >= 0


def _clip_like_before(params, max_norm: float) -> float:
    """The host-side formula ``clip_grad_norm`` used before (one ``float()`` per mesh): the reference."""
    groups: dict[object, list[torch.Tensor]] = {}
    for p in params:
        groups.setdefault(getattr(p.grad, "device_mesh", None), []).append(p.grad)
    total_sq = 0.0
    for grads in groups.values():
        norm = torch.nn.utils.get_total_norm(grads)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        total_sq += float(norm) ** 2
    total = math.sqrt(total_sq)
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        for grads in groups.values():
            torch._foreach_mul_(grads, coef)
    return total


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


@torch.no_grad()
def _clipping_cases(rank, world_size):
    """Per case (tp, max_norm, poison): the old and new norms, the largest gradient difference
    (NaN-aware: 0 when equal, NaNs included), and the new clip's host reads."""
    import torch.nn.functional as F

    from launch.trainer.model import build_model
    from launch.trainer.parallel import build_mesh, clip_grad_norm
    from mano_dist.dispatch import DispatchCounter

    results = []
    for tp in (1, 2):  # FSDP2 over 2 ranks; dp 1 x tp 2: blocks on the 2-D mesh, embedding and head on the 1-D
        cfg = _config(f"parallel.tp={tp}")
        model = build_model(cfg, build_mesh(torch.device("cpu"), world_size, tp), torch.device("cpu"))
        tokens = torch.randint(0, cfg.model.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
        with torch.enable_grad():
            F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()).backward()
        params = list(model.parameters())
        grads = [_local(p.grad).clone() for p in params]

        def reset(poison):
            for p, g in zip(params, grads):
                _local(p.grad).copy_(g)
            if poison:  # on every rank's shard of the first matrix
                _local(params[1].grad).view(-1)[0] = poison

        for max_norm, poison in ((1e-3, 0.0), (1e9, 0.0), (1.0, 0.0), (1e-3, float("nan")), (1e-3, float("inf"))):
            reset(poison)
            want = _clip_like_before(params, max_norm)
            want_grads = [_local(p.grad).clone() for p in params]
            reset(poison)
            with DispatchCounter() as dc:
                got = clip_grad_norm(params, max_norm)
            diff = max(((_local(p.grad) - w).nan_to_num(0.0).abs().max().item() if w.numel() else 0.0) +
                       (0.0 if torch.equal(_local(p.grad).isnan(), w.isnan()) else math.inf)
                       for p, w in zip(params, want_grads))
            results.append(((tp, max_norm, poison), want, got.item(), got.dtype, diff, dc.host_reads))
    return results


@pytest.mark.distributed
def test_device_side_clipping_equals_the_host_formula(tmp_path):
    """``clip_grad_norm`` on FSDP2 DTensor gradients (2 ranks; and dp 1 x tp 2, two meshes): the
    norm and the clipped gradients equal the host-side formula's, bit for bit (clipping, not
    clipping, a NaN norm that scales nothing, an inf norm), with no host read."""
    for rank_results in run_distributed(_clipping_cases, 2, tmp_path):
        for case, want, got, dtype, diff, reads in rank_results:
            assert dtype == torch.float64 and reads == 0, (case, dtype, reads)
            assert got == want or (math.isnan(want) and math.isnan(got)), (case, want, got)
            assert diff == 0.0, (case, diff)


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
    from launch.trainer.engines import deepspeed_config

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
    from launch.trainer.engines import deepspeed_config, describe_optimizer

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
