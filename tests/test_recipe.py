"""The torchrun trainer: a 2-process FSDP2 run trains, writes metrics, checkpoints and a plot,
and a run killed mid-way resumes from its latest checkpoint to the same losses and parameters,
bit for bit; bad input fails with a clear message before any process group can hang."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--set", "model.dim=64", "--set", "model.n_layers=2", "--set", "model.n_heads=2",
         "--set", "model.ffn_dim=172", "--set", "data.seq_len=64", "--set", "train.global_batch=8",
         "--set", "train.steps=10", "--set", "train.log_every=1", "--set", "train.eval_every=5",
         "--set", "train.eval_sequences=8", "--set", "train.checkpoint_every=3",
         "--set", "train.keep_last=5", "--set", "optim.warmup_steps=2"]


def torchrun(out_dir, *extra, launcher=("--standalone", "--nproc-per-node", "2"), env=None, crash=()):
    """The trainer under torchrun; ``crash=(step[, rank])`` runs it through the test-only
    ``tests/train_with_faults.py``, which SIGKILLs that rank (every rank) after that step."""
    entry = ["-m", "launch.train"]
    if crash:
        entry = ["tests/train_with_faults.py", "--crash-at-step", str(crash[0])]
        entry += ["--crash-rank", str(crash[1])] if len(crash) > 1 else []
    cmd = [sys.executable, "-m", "torch.distributed.run", *launcher, *entry,
           "--config", "configs/llama_tiny.toml", "--out-dir", str(out_dir), *SMALL, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def losses(out_dir) -> dict[int, float]:
    """Per step, the last logged loss (a resumed run re-logs the steps after its checkpoint)."""
    recs = [json.loads(line) for line in open(Path(out_dir) / "metrics.jsonl")]
    return {r["step"]: r["loss"] for r in recs}


def final_params(out_dir, step):
    from mano_dist.checkpoint import consolidate

    out = Path(out_dir) / "final.pt"
    consolidate(Path(out_dir) / "checkpoints" / f"step-{step}", out, model_only=True)
    return torch.load(out, weights_only=False)


def assert_same_run(a, b):
    """Same loss at every step and the same final parameters, bit for bit."""
    assert losses(a) == losses(b)
    pa, pb = final_params(a, 10), final_params(b, 10)
    pa, pb = pa.get("model", pa), pb.get("model", pb)
    assert pa.keys() == pb.keys()
    for k in pa:
        assert torch.equal(pa[k], pb[k]), k


def assert_last_step_moved_mano_matrices(out_dir):
    """Step 10 moved every hidden matrix as Mano does (the AdamW fallback alone also lowers the
    loss): from the step-9 and step-10 checkpoints, at the logged lr (Momo: min(lr, its
    Polyak step)), along axis 9 % 2 = 1."""
    from reference import assert_mano_update

    last = json.loads((Path(out_dir) / "metrics.jsonl").read_text().splitlines()[-1])
    lr = min(last["lr"], last.get("momo_polyak_step", last["lr"]))  # Momo-Mano: Mano's step at its tau
    p9, p10 = final_params(out_dir, 9), final_params(out_dir, 10)
    p9, p10 = p9.get("model", p9), p10.get("model", p10)
    matrices = [k for k in p10 if any(m in k for m in ("attention.w", "feed_forward.w"))]
    assert matrices
    for k in matrices:
        assert_mano_update(p9[k], p10[k], lr=lr, weight_decay=0.1, axis=1)


def ds_json(folder, stage, **batch_keys) -> Path:
    """configs/ds_zero{stage}.json with its batch keys replaced by ``batch_keys`` (none: the
    trainer derives them from train.*; the shipped files' micro-batch of 8 would not divide
    these tests' 4 sequences per rank, a conflict the trainer refuses)."""
    ds = json.loads((ROOT / "configs" / f"ds_zero{stage}.json").read_text())
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        ds.pop(key, None)
    path = Path(folder) / f"ds_zero{stage}_{'_'.join(f'{k}{v}' for k, v in batch_keys.items())}.json"
    path.write_text(json.dumps(ds | batch_keys))
    return path


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """One uninterrupted 2-process run, the reference for the tests below."""
    out = tmp_path_factory.mktemp("straight")
    proc = torchrun(out, "--resume", "none")
    output = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, output
    return out, output


@pytest.mark.distributed
def test_two_process_run_trains_and_resumes_bit_for_bit_after_kill(tmp_path, straight):
    out, output = straight
    assert "final validation perplexity" in output and "loss plot:" in output
    assert (out / "loss.png").stat().st_size > 0
    steps = losses(out)
    assert sorted(steps) == list(range(1, 11))
    assert steps[10] < steps[1] - 0.5, steps  # stated margin: at least 0.5 nat in 10 steps
    assert_last_step_moved_mano_matrices(out)
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step-10", "step-3", "step-6", "step-9"]

    # Every rank SIGKILLs itself after step 5 (tests/train_with_faults.py: a lost node): the
    # newest complete checkpoint is step 3 (odd: the rotation phase must resume right).
    killed = torchrun(tmp_path, "--resume", "none", crash=(5,))
    output = killed.communicate(timeout=600)[0]
    assert killed.returncode != 0, output
    resumed = torchrun(tmp_path, "--resume", "auto")
    output = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, output
    assert "resumed from" in output and "at step 3" in output, output
    assert_same_run(out, tmp_path)


@pytest.mark.distributed
def test_elastic_restart_resumes_from_checkpoint(tmp_path, straight):
    """Rank 1 dies after step 5; torchrun (--max-restarts 1) restarts the workers, which resume
    from step 3 and end where the uninterrupted run ends."""
    launcher = ("--standalone", "--nproc-per-node", "2", "--max-restarts", "1")
    proc = torchrun(tmp_path, launcher=launcher, crash=(5, 1))
    output = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, output
    assert "resumed from" in output and "at step 3" in output, output
    assert_same_run(straight[0], tmp_path)


@pytest.mark.distributed
def test_two_nodes_over_loopback_match_one_node(tmp_path, straight):
    """Two torchrun invocations (--nnodes 2, one process each) rendezvous over c10d on loopback."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = ("--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "mano-test")
    nodes = [torchrun(tmp_path, "--resume", "none", launcher=launcher) for _ in range(2)]
    outputs = [n.communicate(timeout=600)[0] for n in nodes]
    assert all(n.returncode == 0 for n in nodes), outputs
    assert any("2 rank(s)" in o for o in outputs), outputs
    assert_same_run(straight[0], tmp_path)


@pytest.mark.distributed
def test_tensor_parallel_run_matches_data_parallel(tmp_path, straight):
    """dp 2 x tp 2 (4 processes; colwise/rowwise blocks under FSDP2) trains the same model on the
    same batches as dp 2: losses and final parameters agree to float rounding."""
    launcher = ("--standalone", "--nproc-per-node", "4")
    proc = torchrun(tmp_path, "--resume", "none", "--set", "parallel.tp=2", launcher=launcher)
    output = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, output
    assert "(dp 2, tp 2)" in output
    ref, got = losses(straight[0]), losses(tmp_path)
    assert ref.keys() == got.keys()
    assert all(abs(ref[k] - got[k]) < 1e-4 for k in ref), (ref, got)
    pa, pb = final_params(straight[0], 10), final_params(tmp_path, 10)
    pa, pb = pa.get("model", pa), pb.get("model", pb)
    for k in pa:  # Mano's matrices agree to ~1e-8; AdamW's g/sqrt(v) amplifies rounding of
        # near-zero embedding gradients (one element moved 8e-5 in 10 steps)
        tol = 1e-6 if any(m in k for m in ("attention.w", "feed_forward.w")) else 2e-4
        torch.testing.assert_close(pb[k], pa[k], rtol=0, atol=tol, msg=k)


@pytest.mark.distributed
@pytest.mark.parametrize("name", ["muon", "momo-mano"])
def test_baseline_optimizers_train_under_fsdp2(tmp_path, name):
    """The trainer drives the baselines by name (Momo gets the loss); 10 steps lower the loss."""
    proc = torchrun(tmp_path, "--resume", "none", "--set", f"optim.name={name}")
    output = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, output
    assert f"optimizer {name}" in output
    steps = losses(tmp_path)
    assert steps[10] < steps[1] - 0.3, steps
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    if name.startswith("momo"):  # Momo's own step size is logged (the step taken is min(lr, it))
        assert all(r["momo_polyak_step"] > 0 for r in recs), recs
        assert_last_step_moved_mano_matrices(tmp_path)
    else:
        assert all("momo_polyak_step" not in r for r in recs)


@pytest.mark.deepspeed
@pytest.mark.distributed
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_engine_matches_fsdp2_and_resumes(tmp_path, straight, stage):
    """--engine deepspeed (Mano from the JSON on ZeRO flat partitions) trains the same model on
    the same batches as FSDP2: same losses to float rounding; killed after step 5, it resumes
    from its step-3 checkpoint (engine.save_checkpoint, data position as client state) and ends
    with the same losses as its uninterrupted run."""
    ds = ("--engine", "deepspeed", "--ds-config", str(ds_json(tmp_path, stage)))
    env = {"DS_ACCELERATOR": "cpu"}
    whole = tmp_path / "whole"
    proc = torchrun(whole, "--resume", "none", *ds, env=env)
    output = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, output
    ref, got = losses(straight[0]), losses(whole)
    assert ref.keys() == got.keys() and all(abs(ref[k] - got[k]) < 1e-4 for k in ref), (ref, got)

    cut = tmp_path / "cut"
    killed = torchrun(cut, "--resume", "none", *ds, env=env, crash=(5,))
    output = killed.communicate(timeout=600)[0]
    assert killed.returncode != 0, output
    resumed = torchrun(cut, "--resume", "auto", *ds, env=env)
    output = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, output
    assert "at step 3" in output, output
    assert losses(cut) == losses(whole)
    # ...and the same final parameters and Mano state, bit for bit (the losses cannot see the last update)
    from mano_dist.deepspeed.checkpoint import consolidate

    a, b = (consolidate(str(d / "ds_checkpoints"), "step-10") for d in (whole, cut))
    assert set(a["params"]) == set(b["params"]) and a["params"]
    for k in a["params"]:
        assert torch.equal(a["params"][k], b["params"][k]), k
        assert all(torch.equal(v, b["state"][k][key]) for key, v in a["state"][k].items()), k


@pytest.mark.parametrize("extra,message", [
    (["--set", "train.bogus=1"], "unknown key 'train.bogus'"),
    (["--data", "/no/such/file.txt"], "matches no file"),
    (["--set", "data.seq_len=512"], "exceeds model.max_seq_len"),
    (["--set", "train.global_batch=7"], "not divisible by the 2 data-parallel ranks"),
    (["--set", "parallel.tp=3"], "parallel.tp 3 must be >= 1 and divide model.n_heads"),
    (["--set", "parallel.engine=deepspeed"], "needs parallel.ds_config"),
    (["--set", "optim.name=sgd"], "optim.name must be one of mano, adamw, muon"),
    (["--set", "train.micro_batch=3"], "train.micro_batch 3 does not divide the 4 sequences per rank"),
    (["--set", "train.activation_checkpoint=some"], "train.activation_checkpoint must be one of none, full"),
    (["--set", "train.mixed_precision=fp8"], "train.mixed_precision must be one of none, bf16"),
    (["--engine", "deepspeed", "--ds-config", "configs/ds_zero2.json"], "does not divide the 4 sequences per rank"),
    (["--engine", "deepspeed", "--ds-config", "configs/ds_zero2.json", "--set", "train.global_batch=16",
      "--set", "optim.name=adamw"], "names optimizer 'Mano' but optim.name = 'adamw'"),
])
def test_bad_input_fails_clearly_without_hanging(tmp_path, extra, message):
    proc = torchrun(tmp_path, "--resume", "none", *extra)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0 and message in output, output


def test_command_line_shorthands_become_overrides():
    from launch.config import load_config
    from launch.trainer.loop import parse_args

    args = parse_args(["--data", "corpus/a.jsonl,corpus/*.txt", "--engine", "deepspeed",
                       "--ds-config", "configs/ds_zero2.json", "--set", "optim.lr=0.01"])
    cfg = load_config(ROOT / "configs" / "llama_tiny.toml", args.overrides)
    assert cfg.data.source == "corpus/a.jsonl,corpus/*.txt"
    assert (cfg.parallel.engine, cfg.parallel.ds_config, cfg.optim.lr) == ("deepspeed", "configs/ds_zero2.json", 0.01)


@pytest.mark.parametrize("name,millions", [("tiny", 5.26), ("130m", 134.1), ("350m", 368.0), ("1b", 1364.3), ("3b", 2685.8)])
def test_presets_build_on_meta_with_expected_sizes(name, millions):
    from launch.config import load_config
    from launch.trainer.model import Llama, count_parameters

    cfg = load_config(ROOT / "configs" / f"llama_{name}.toml")
    with torch.device("meta"):
        model = Llama(cfg.model)
    assert abs(count_parameters(model) / 1e6 - millions) < 0.05
