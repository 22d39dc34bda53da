"""The planner: exact parameter counts of the presets, the memory model's ratios, and its Mano
traffic formula against what the optimizer really sends under FSDP2 and TP+FSDP2."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dist import run_distributed
from launch.config import ModelConfig, load_config
from launch.trainer.model import Llama
from launch.trainer.plan import activation_bytes, count_parameters_by_role, main, memory_per_gpu, optimizer_traffic

ROOT = Path(__file__).resolve().parents[1]
TINY = ModelConfig(dim=64, n_layers=2, n_heads=2, ffn_dim=172, vocab_size=512, max_seq_len=32)


def test_1b_preset_counts_by_role():
    with torch.device("meta"):
        c = count_parameters_by_role(Llama(load_config(ROOT / "configs/llama_1b.toml").model))
    per_block = 4 * 2048 * 2048 + 3 * 2048 * 5632  # FFN 5461 rounded up to a multiple of 256
    assert c.matrix_elements == 24 * per_block and len(c.matrices) == 24 * 7
    assert c.embeddings == c.head == 32000 * 2048
    assert c.other == (2 * 24 + 1) * 2048
    assert c.total == 1_364_297_728


def test_memory_model():
    with torch.device("meta"):
        c = count_parameters_by_role(Llama(TINY))
    z3, fsdp = memory_per_gpu(c, "zero3", 8), memory_per_gpu(c, "fsdp2", 8)
    assert fsdp["mano"] == pytest.approx((4 * c.matrix_elements + 8 * c.fallback) / 8)
    assert fsdp["adamw"] == pytest.approx(8 * c.total / 8)
    assert z3["params"] == pytest.approx(6 * c.total / 8)
    assert memory_per_gpu(c, "zero1", 8)["grads"] == pytest.approx(2 * c.total)
    with pytest.raises(ValueError, match="strategy"):
        memory_per_gpu(c, "zero4", 8)


def _measure_mano_traffic(rank, world_size, tp):
    from launch.trainer.parallel import build_mesh, shard_model
    from mano_dist import CollectiveCounter, Mano, mano_param_groups

    torch.manual_seed(0)
    model = Llama(TINY)
    shard_model(model, build_mesh(torch.device("cpu"), world_size, tp))
    opt = Mano(mano_param_groups(model), lr=0.01, nonfinite="ignore")
    wire = 0.0
    for step in range(2):  # both rotation phases
        torch.manual_seed(1 + step)
        model(torch.randint(0, TINY.vocab_size, (2, 16))).float().pow(2).mean().backward()
        with CollectiveCounter() as cc:
            opt.step()
        assert cc.count() == cc.count("all_reduce")
        wire += cc.wire_bytes()
        opt.zero_grad()
    return wire / 2


@pytest.mark.distributed
@pytest.mark.parametrize("world_size,tp", [(2, 1), (4, 2)])
def test_planned_mano_traffic_equals_measured(tmp_path, world_size, tp):
    with torch.device("meta"):
        c = count_parameters_by_role(Llama(TINY))
    measured = run_distributed(_measure_mano_traffic, world_size, tmp_path, tp)
    planned = optimizer_traffic(c, world_size // tp, tp)["mano_fsdp2"]
    assert planned > 0
    assert all(m == pytest.approx(planned, rel=1e-9) for m in measured), (measured, planned)


def test_command_prints_tables_and_rejects_bad_degrees(capsys):
    assert main(["--config", str(ROOT / "configs/llama_3b.toml"), "--nodes", "2", "--gpus-per-node", "8", "--tp", "2"]) == 0
    out = capsys.readouterr().out
    assert "2,685,831,680 parameters" in out and "data parallel 8, tensor parallel 2" in out
    for row in ("fsdp2", "zero1", "zero2", "zero3", "Mano, FSDP2/TP", "Muon, FSDP2", "Dion-style"):
        assert row in out
    assert "activations the blocks keep per micro-batch of 1024-token sequences" in out
    assert "largest micro-batch whose peak + 3 GiB reserve fits 80 GiB with 10% headroom: train.micro_batch = " in out
    with pytest.raises(SystemExit):
        main(["--config", str(ROOT / "configs/llama_3b.toml"), "--nodes", "1", "--gpus-per-node", "8", "--tp", "3"])
    assert "cannot be split" in capsys.readouterr().err


def test_activation_model_of_the_1b_block():
    """The closed form read off the block's ops, at 1.3B width in bf16: 16 d for the two norms,
    7 x 2 d for attention, 4 x 2 ffn for SwiGLU, 4 bytes of log-sum-exp per head, 8 for the
    norms' fp32 rsqrt; checkpointing keeps each block's bf16 input."""
    m = load_config(ROOT / "configs/llama_1b.toml").model
    f = m.ffn_dim  # 5632
    per_token = 16 * 2048 + 14 * 2048 + 8 * f + 4 * 32 + 8
    assert activation_bytes(m, 1024, 2) == 2048 * 24 * per_token
    assert activation_bytes(m, 1024, 2, checkpoint="full") == 2048 * 24 * 2 * 2048
    tp2 = 16 * 2048 + (14 * 2048 + 8 * f + 4 * 32) / 2 + 8
    assert activation_bytes(m, 1024, 1, tp=2) == 1024 * 24 * tp2
