"""The memory dry run: its storage counter, the optimizer step on fake tensors with the fake
process group, exact per-rank categories, the planner against it, and the command's verdicts."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from launch.config import ModelConfig, load_config
from launch.trainer.dryrun import COMPILE_NOTE, PeakTracker, dry_run, report
from launch.trainer.model import Llama
from launch.trainer.plan import count_parameters_by_role, main, predict_peak

ROOT = Path(__file__).resolve().parents[1]
# Every dim divisible by 4, so FSDP2's shards over 4 ranks are even and the bytes exact.
SMALL = ModelConfig(dim=64, n_layers=2, n_heads=4, ffn_dim=128, vocab_size=512, max_seq_len=32)
LINE = re.compile(r"^dry run: peak \d+\.\d GiB per rank of [\d.]+ GiB: (fits|does not fit)$")


def test_peak_tracker_counts_live_storages_views_once_and_resizes():
    with PeakTracker() as tracker:
        a = torch.zeros(1000)          # 4000 B
        view = a[:10]                  # same storage: not counted again
        b = torch.ones(500, dtype=torch.float64)  # 4000 B
        assert tracker.live == 8000 and tracker.peak == 8000
        del a, view
        assert tracker.live == 4000
        b.untyped_storage().resize_(0)  # what FSDP2 does to free an all-gather buffer
        assert tracker.live == 0
        b.untyped_storage().resize_(800)
        assert tracker.live == 800 and tracker.peak == 8000


def _small_cfg(**train):
    cfg = load_config(None, [])
    cfg.model = SMALL
    cfg.data.seq_len = 32
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


def test_mano_step_runs_on_fake_tensors_and_takes_the_full_path():
    """Sharded Mano with the non-finite check on, 4 fake ranks, eager and fused: the step runs
    with nothing to read on the host (the skip is decided on the device), counts as taken, and
    issues 1 all-reduce for the non-finite flag + 1 round of slice sums over dp (the fused path
    runs its segments eagerly on fake tensors: the same collectives, its sums before the flag,
    which they feed)."""
    from torch._subclasses.fake_tensor import FakeTensorMode, is_fake
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from launch.trainer.parallel import build_mesh, shard_model
    from mano_dist import CollectiveCounter, Mano, mano_param_groups

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=4)
    try:
        mesh = build_mesh(torch.device("cpu"), 4, 1)
        with FakeTensorMode(allow_non_fake_inputs=True):
            model = Llama(SMALL)
            shard_model(model, mesh)
            counters = []
            for fused in (False, True):
                opt = Mano(mano_param_groups(model), lr=0.01, nonfinite="skip", fused=fused)
                tokens = torch.randint(0, SMALL.vocab_size, (2, 17))
                F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()).backward()
                with CollectiveCounter() as cc:
                    opt.step()
                counters.append([(c.kind, c.payload_bytes) for c in cc.calls])
                model.zero_grad()
            weight = model.layers[0].attention.wq.weight
            assert is_fake(weight.to_local())
    finally:
        dist.destroy_process_group()
    assert opt.skipped_steps == 0 and all(g["step"] == 1 for g in opt.param_groups)
    assert cc.count() == cc.count("all_reduce") == 2, cc.summary()
    assert counters[0] == counters[1][::-1], counters


def test_dry_run_categories_are_the_exact_shards():
    cfg = _small_cfg(global_batch=16, micro_batch=2, mixed_precision="bf16")
    r = dry_run(cfg, 4)
    with torch.device("meta"):
        c = count_parameters_by_role(Llama(SMALL))
    assert (r.dp, r.tp, r.micro_batch, r.accumulation) == (4, 1, 2, 2)
    assert r.params == r.grads == 4 * c.total // 4
    n_adamw = 2 * SMALL.n_layers + 3  # norms, final norm, embedding, head: one 4-byte step counter each
    assert r.optimizer_state == (4 * c.matrix_elements + 8 * c.fallback) // 4 + 4 * n_adamw
    assert r.peak > r.params + r.grads + r.optimizer_state
    assert "aten._scaled_dot_product_flash_attention_for_cpu" in r.attention_ops


def test_dry_run_says_compiled_blocks_are_traced_eager():
    """torch.compile cannot run on the fake tensors under the tracker: the dry run traces the
    eager blocks (the same peak as without compile) and its report says so, once, above the
    verdict line that scripts read."""
    compiled = dry_run(_small_cfg(global_batch=16, micro_batch=2, compile=True), 2)
    eager = dry_run(_small_cfg(global_batch=16, micro_batch=2), 2)
    assert compiled.compile_traced_eager and not eager.compile_traced_eager
    assert compiled.peak == eager.peak
    lines, _ = report(compiled, 80)
    assert lines.count(COMPILE_NOTE) == 1 and lines[-2] == COMPILE_NOTE and LINE.match(lines[-1]), lines
    assert COMPILE_NOTE.startswith("note: train.compile = true is traced eager") and "fake" in COMPILE_NOTE
    assert "inductor" in COMPILE_NOTE and COMPILE_NOTE not in report(eager, 80)[0]


@pytest.mark.parametrize("checkpoint", ["none", "full"])
def test_planner_agrees_with_the_dry_run(checkpoint):
    """Closed form vs trace, at a width where activations dominate (as in the presets)."""
    m = ModelConfig(dim=512, n_layers=4, n_heads=8, ffn_dim=1368, vocab_size=4096, max_seq_len=256)
    cfg = _small_cfg(global_batch=16, micro_batch=4, mixed_precision="bf16", activation_checkpoint=checkpoint)
    cfg.model, cfg.data.seq_len = m, 256
    traced = dry_run(cfg, 2).peak
    assert predict_peak(cfg, 2, 1, 4) == pytest.approx(traced, rel=0.15)


@pytest.mark.slow
def test_1b_preset_fits_on_8_gpus_and_an_oversized_micro_batch_does_not(capsys):
    code = main(["--config", str(ROOT / "configs/llama_1b.toml"), "--nodes", "1", "--gpus-per-node", "8",
                 "--gpu-mem", "80", "--dry-run"])
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and LINE.match(out[-1]) and out[-1].endswith(": fits"), out[-12:]
    assert "largest micro-batch" in "\n".join(out)
    code = main(["--config", str(ROOT / "configs/llama_130m.toml"), "--nodes", "1", "--gpus-per-node", "2",
                 "--gpu-mem", "16", "--set", "train.micro_batch=64", "--set", "train.global_batch=128", "--dry-run"])
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 3 and LINE.match(out[-1]) and out[-1].endswith(": does not fit"), out[-12:]
