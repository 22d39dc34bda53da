"""Mano inside torchtitan's own Trainer (torchtitan 0.3.0), 2 gloo ranks, FSDP2, tiny LLaMA 3.

Each rank runs ``Trainer`` built from the shipped config function
(``mano_dist.integrations.torchtitan_configs.mano_llama3_debugmodel``) with the tiny model,
offline tokenizer/text and the four CPU switches of ``tests.torchtitan_harness`` (module
docstring there). What is checked:

- the optimizer is one ``mano_dist.Mano`` inside ``ManoOptimizersContainer``, its state on the
  FSDP2 shards, every fused ``wqkv`` in a Mano group whose ``"splits"`` are torchtitan's own row
  layout (the rows ``FusedQKVLinear``'s state-dict hook gives ``wq``/``wk``/``wv``);
- after every step the params equal plain ``mano_dist.Mano`` on one unsharded copy of the model
  (same initial weights, the global batch the two ranks saw, the lr the scheduler set, groups
  built independently with ``mano_param_groups``) to fp32 tolerance;
- torchtitan's DCP checkpointer: resuming from the step-2 checkpoint reproduces steps 3-4.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.dist import run_distributed

WORLD, STEPS, LR = 2, 4, 0.02
ENV = {"OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29657"}


def _set_rank_env(rank, world_size):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size))


def _optimizer_facts(trainer):
    from torch.distributed.tensor import DTensor
    from torchtitan.models.common.attention import FusedQKVLinear

    from mano_dist import Mano
    from mano_dist.integrations.torchtitan import ManoOptimizersContainer, mano_state_is_sharded

    container = trainer.optimizers
    model = trainer.model_parts[0]
    wqkv = {id(m.wqkv.weight): m for m in model.modules() if isinstance(m, FusedQKVLinear)}
    split_groups = [(name, group.get("splits"), group["algorithm"]) for opt in container for group in opt.param_groups
                    for name, p in zip(group["param_names"], group["params"]) if id(p) in wqkv]
    # torchtitan's own split of wqkv into wq/wk/wv (its state-dict hook), on a numbered weight
    module = next(iter(wqkv.values()))
    rows = module.wqkv.weight.shape[0]
    numbered = torch.arange(rows, dtype=torch.float32)[:, None].expand(rows, module.wqkv.weight.shape[1])
    sd = {"wqkv.weight": numbered.clone()}
    FusedQKVLinear._split_qkv_on_save(module, sd, "", None)
    return {
        "container": type(container).__name__, "is_container": isinstance(container, ManoOptimizersContainer),
        "optimizers": [type(o).__name__ for o in container], "is_mano": all(isinstance(o, Mano) for o in container),
        "sharded_params": all(isinstance(p, DTensor) for p in model.parameters()),
        "sharded_state": mano_state_is_sharded(container),
        "algorithms": {n: g["algorithm"] for o in container for g in o.param_groups for n in g["param_names"]},
        "wqkv_groups": split_groups,
        "torchtitan_qkv_rows": {k: v[:, 0].long().tolist() for k, v in sd.items()},
        "qkv_dims": (module.heads_per_kv, module.head_dim, rows),
    }


def _reference(records, initial, *, split=True):
    """Plain Mano on one unsharded copy, the global batch of each step, the recorded lr
    (``split=False``: without ``"splits"`` on ``wqkv``, to show that the split changes the run)."""
    import torch.nn.functional as F

    from mano_dist import Mano, mano_param_groups
    from mano_dist.integrations.torchtitan import ADAMW_PATTERN, WQKV_PATTERN, fused_qkv_row_splits
    from tests.torchtitan_harness import HEAD_DIM, N_HEADS, N_KV_HEADS, tiny_llama_config

    config = tiny_llama_config()
    with torch.device("meta"):
        model = config.build()
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.init_weights(buffer_device=None)
        for name, p in model.named_parameters():
            p.copy_(initial[name])
    splits = {WQKV_PATTERN: fused_qkv_row_splits(N_HEADS, N_KV_HEADS, HEAD_DIM)} if split else None
    groups = mano_param_groups(model, adamw_patterns=[ADAMW_PATTERN], splits=splits,
                               mano_options={"weight_decay": 0.05}, adamw_options={"weight_decay": 0.05})
    optimizer = Mano(groups, lr=LR, variant="v2", weight_decay=0.05)
    out = []
    for step_records in records:  # one entry per step: [rank0 record, rank1 record]
        inputs = torch.cat([r["batches"][0][0]["input"] for r in step_records])
        positions = torch.cat([r["batches"][0][0]["positions"] for r in step_records])
        labels = torch.cat([r["batches"][0][1] for r in step_records])
        masks = model.get_attention_masks(positions=positions)
        logits = model(inputs, positions, masks)
        valid = labels != -100
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100,
                               reduction="sum") / valid.sum()
        loss.backward()
        scale = step_records[0]["lrs"][0] / LR  # the scheduler's factor (one base lr for all groups)
        for group in optimizer.param_groups:
            group["lr"] = LR * scale
        optimizer.step()
        optimizer.zero_grad()
        out.append({n: p.detach().clone() for n, p in model.named_parameters()})
    return out


def _torchtitan_body(rank, world_size, folder):
    _set_rank_env(rank, world_size)
    from tests import torchtitan_harness as harness

    harness.patch_torchtitan_for_cpu_gloo()

    full = harness.tiny_trainer_config(folder, steps=STEPS, lr=LR, checkpoint_interval=2).build()
    full.train()
    facts = _optimizer_facts(full)
    first = {"records": full.records, "initial": full.initial_params}
    full.close()

    # The reference, on rank 0 (no collectives), from the batches every rank trained on.
    batches = [None] * world_size
    torch.distributed.all_gather_object(batches, [(r["batches"], r["lrs"]) for r in full.records])
    if rank == 0:
        steps = [[{"batches": batches[k][s][0], "lrs": batches[k][s][1]} for k in range(world_size)]
                 for s in range(STEPS)]
        first["reference"] = _reference(steps, full.initial_params)
        first["unsplit_reference"] = _reference(steps, full.initial_params, split=False)

    resumed = harness.tiny_trainer_config(folder, steps=STEPS, lr=LR, checkpoint_interval=2, load_step=2).build()
    resumed.train()
    out = {"facts": facts, "first": first, "resumed": resumed.records}
    resumed.close()
    return out


def _max_error(got, want):
    return max((got[n] - want[n]).abs().max().item() for n in want)


@pytest.mark.distributed
@pytest.mark.slow
def test_torchtitan_trainer_with_mano_matches_plain_mano_splits_wqkv_and_resumes(tmp_path):
    pytest.importorskip("torchtitan")  # conftest: fails the run under MANO_FAIL_ON_MISSING_DEPENDENCY=1
    from tests.torchtitan_harness import HEAD_DIM, N_HEADS, N_KV_HEADS, write_assets

    from mano_dist.integrations.torchtitan import fused_qkv_row_blocks, fused_qkv_row_splits

    write_assets(str(tmp_path))
    results = run_distributed(_torchtitan_body, WORLD, tmp_path, str(tmp_path), env=ENV, timeout=300)
    facts = results[0]["facts"]

    # One Mano in torchtitan's container, on FSDP2 shards; fallback routing by name.
    assert facts["is_container"] and facts["is_mano"] and facts["optimizers"] == ["Mano"]
    assert facts["sharded_params"] and facts["sharded_state"]
    algorithms = facts["algorithms"]
    for name in ("tok_embeddings.weight", "lm_head.weight", "norm.weight", "layers.0.attention_norm.weight"):
        assert algorithms[name] == "adamw", name
    for name in ("layers.0.attention.qkv_linear.wqkv.weight", "layers.1.attention.wo.weight",
                 "layers.0.feed_forward.w1.weight", "layers.1.feed_forward.w2.weight"):
        assert algorithms[name] == "mano", name

    # wqkv: split, with the rows torchtitan itself assigns to wq, wk and wv.
    splits = fused_qkv_row_splits(N_HEADS, N_KV_HEADS, HEAD_DIM)
    assert splits == (2 * HEAD_DIM, HEAD_DIM, HEAD_DIM) * N_KV_HEADS
    assert len(facts["wqkv_groups"]) == 2
    assert all(s == splits and a == "mano" for _, s, a in facts["wqkv_groups"])
    blocks = fused_qkv_row_blocks(N_HEADS, N_KV_HEADS, HEAD_DIM)
    rows = {kind: [r for k, _, sl in blocks if k == kind for r in range(sl.start, sl.stop)] for kind in "qkv"}
    tt_rows = facts["torchtitan_qkv_rows"]
    assert rows == {"q": tt_rows["wq.weight"], "k": tt_rows["wk.weight"], "v": tt_rows["wv.weight"]}
    assert sum(splits) == facts["qkv_dims"][2]

    # Equal to plain Mano on the unsharded model, after every step.
    first = [r["first"] for r in results]
    records = [[first[rank]["records"][s] for rank in range(WORLD)] for s in range(STEPS)]
    assert [r[0]["step"] for r in records] == list(range(1, STEPS + 1))
    reference = first[0]["reference"]
    for step in range(STEPS):
        for rank in range(WORLD):
            error = _max_error(records[step][rank]["params"], reference[step])
            assert error < 1e-5, (step, rank, error)  # measured: <= 1.2e-7
    assert _max_error(records[-1][0]["params"], first[0]["initial"]) > 1e-3  # it trained
    unsplit = first[0]["unsplit_reference"][-1]
    wqkv = "layers.0.attention.qkv_linear.wqkv.weight"
    assert (unsplit[wqkv] - reference[-1][wqkv]).abs().max() > 1e-4  # the split is what matched

    # DCP resume from the step-2 checkpoint: steps 3 and 4 again, identical.
    for rank in range(WORLD):
        resumed = results[rank]["resumed"]
        assert [r["step"] for r in resumed] == [3, 4]
        for r in resumed:
            want = first[rank]["records"][r["step"] - 1]["params"]
            for name, p in want.items():
                assert torch.equal(r["params"][name], p), (rank, r["step"], name)


# ------------------------------------------------------------------ one process: config and checks
def test_config_function_runs_through_torchtitans_module_config_cli():
    """``--module mano_dist.integrations.torchtitan_configs --config ...`` as ``torchtitan.train``
    parses it (``ConfigManager``), CLI overrides included."""
    pytest.importorskip("torchtitan")
    from torchtitan.config import ConfigManager

    from mano_dist.integrations.torchtitan import ManoOptimizersContainer

    config = ConfigManager().parse_args([
        "--module", "mano_dist.integrations.torchtitan_configs", "--config", "mano_llama3_8b",
        "--parallelism.spmd_backend", "partial_dtensor", "--training.steps", "3"])
    assert isinstance(config.optimizer, ManoOptimizersContainer.Config)
    assert (config.training.steps, config.parallelism.spmd_backend) == (3, "partial_dtensor")
    groups = {g.pattern: g.optimizer_kwargs for g in config.optimizer.param_groups}
    assert {g.optimizer_name for g in config.optimizer.param_groups} == {"Mano"}
    wqkv = [kw for kw in groups.values() if "splits" in kw]
    assert [kw["splits"] for kw in wqkv] == [(512, 128, 128) * 8]  # 32 heads, 8 KV heads, head_dim 128


def test_container_refuses_a_fused_qkv_without_its_splits():
    pytest.importorskip("torchtitan")
    from torchtitan.components.optimizer import ParamGroupConfig

    from mano_dist.integrations.torchtitan import (
        ADAMW_PATTERN, ManoOptimizersContainer, llama_param_group_configs,
    )
    from tests.torchtitan_harness import tiny_llama_config

    config = tiny_llama_config()
    with torch.device("meta"):
        model = config.build()
    model.to_empty(device="cpu")
    good = ManoOptimizersContainer.Config(param_groups=llama_param_group_configs(config, lr=1e-3)).build(
        model_parts=[model])
    assert [type(o).__name__ for o in good] == ["Mano"]
    unsplit = [ParamGroupConfig(pattern=ADAMW_PATTERN, optimizer_name="Mano", optimizer_kwargs={"algorithm": "adamw"}),
               ParamGroupConfig(pattern=r"layers\.", optimizer_name="Mano", optimizer_kwargs={"lr": 1e-3})]
    with pytest.raises(ValueError, match="splits"):
        ManoOptimizersContainer.Config(param_groups=unsplit).build(model_parts=[model])


def test_import_mano_dist_does_not_import_torchtitan():
    import subprocess
    import sys

    code = "import sys, mano_dist, mano_dist.integrations; print('torchtitan' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
