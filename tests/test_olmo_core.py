"""Mano through OLMo-core 3.0: ``mano_dist.integrations.olmo_core.ManoConfig`` (registered as
``"mano"``) on a tiny OLMo-core transformer, 2 gloo ranks, two ways:

1. by hand: the model's own ``apply_fsdp`` (FSDP2), ``config.build(model)``, saved and loaded with
   OLMo-core's DCP functions ``save_model_and_optim_state`` / ``load_model_and_optim_state``;
2. as its Trainer does: ``TransformerTrainModuleConfig(optim=ManoConfig(...), dp_config=fsdp)
   .build(model)`` (world mesh, ``parallelize_model``, ``optim.build``), ``optim_step()``, and
   the Trainer's ``Checkpointer`` (flattened optimizer state dict) to save and resume.

Reference: plain Mano on the unsharded model and the global batch in one process, routed by
:func:`classify_parameters`. OLMo-core is not patched; the one process-wide value reset between
two train modules in one process is :func:`_forget_world_mesh`'s.

Needs ``mano-dist[olmo]`` (ai2-olmo-core 3.0.0). OLMo-core is imported inside the tests (not at
collection, ~5 s that every pytest run would pay); a missing package fails them, never skips
them (see tests/conftest.py).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.dist import run_distributed

WORLD, MICRO, SEQ, VOCAB, STEPS, SAVE_AFTER = 2, 2, 16, 80, 4, 2
CONFIG = {"lr": 0.02, "weight_decay": 0.05, "momentum": 0.9, "variant": "v2", "betas": (0.9, 0.99)}
ENV = {"OMP_NUM_THREADS": "1"}


def tiny_transformer(seed: int = 0):
    from olmo_core.nn.transformer import TransformerConfig

    torch.manual_seed(seed)
    config = TransformerConfig.llama_like(d_model=32, vocab_size=VOCAB, n_layers=2, n_heads=4,
                                          hidden_size_multiple_of=16)
    model = config.build(init_device="cpu")
    model.init_weights(device=torch.device("cpu"))
    return model


def global_batch(step: int) -> torch.Tensor:
    """Learnable sequences t, t+s, ... (mod VOCAB); WORLD * MICRO of them per step."""
    g = torch.Generator().manual_seed(1000 + step)
    start = torch.randint(0, VOCAB, (WORLD * MICRO, 1), generator=g)
    stride = torch.randint(1, 4, (WORLD * MICRO, 1), generator=g)
    return (start + stride * torch.arange(SEQ + 1)) % VOCAB


def loss_of(model, tokens):
    return model(tokens[:, :-1], labels=tokens[:, 1:]).loss


def full_params(model):
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in model.named_parameters()}


def _train(model, optimizer, rank, steps, *, save_after=None, save_dir=None):
    from olmo_core.distributed.checkpoint import save_model_and_optim_state

    out = []
    for step in steps:
        tokens = global_batch(step)[rank * MICRO:(rank + 1) * MICRO]
        loss_of(model, tokens).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        out.append(full_params(model))
        if step == save_after:
            save_model_and_optim_state(save_dir, model, optimizer)
    return out


def _forget_world_mesh():
    """OLMo-core keeps one world mesh per process and refuses to build a second
    (``build_world_mesh``: "You can only call 'build_world_mesh' once!"); a real resume is a new
    process. The resumed train module here lives in the same process, so the global is cleared."""
    import olmo_core.distributed.parallel as parallel

    parallel._WORLD_MESH = None


def _train_module(seed: int):
    from olmo_core.config import DType
    from olmo_core.distributed.parallel import DataParallelType
    from olmo_core.train.train_module import TransformerDataParallelConfig, TransformerTrainModuleConfig

    from mano_dist.integrations.olmo_core import ManoConfig

    config = TransformerTrainModuleConfig(
        rank_microbatch_size=MICRO * SEQ, max_sequence_length=SEQ, optim=ManoConfig(**CONFIG),
        dp_config=TransformerDataParallelConfig(name=DataParallelType.fsdp, param_dtype=DType.float32))
    return config.build(tiny_transformer(seed), device=torch.device("cpu"))


def _train_module_run(rank, work_dir):
    """``optim_step``/``zero_grads`` are the train module's; forward/backward as in ``train_batch``
    with one micro-batch (``train_batch`` itself records metrics on a Trainer)."""
    import pathlib

    from olmo_core.train.checkpoint import Checkpointer

    checkpointer = Checkpointer(work_dir=pathlib.Path(work_dir) / "work")

    def train(module, steps, save_after=None):
        out = []
        for step in steps:
            tokens = global_batch(step)[rank * MICRO:(rank + 1) * MICRO]
            loss_of(module.model, tokens).backward()
            module.optim_step()
            module.zero_grads()
            out.append(full_params(module.model))
            if step == save_after:
                checkpointer.save(f"{work_dir}/step{step + 1}", module, {"global_step": step + 1})
        return out

    module = _train_module(0)
    run = {"type": type(module.optim).__name__, "mesh": tuple(module.world_mesh.mesh_dim_names)}
    run["params"] = train(module, range(STEPS), save_after=SAVE_AFTER - 1)
    _forget_world_mesh()
    resumed = _train_module(1)
    checkpointer.load(f"{work_dir}/step{SAVE_AFTER}", resumed)
    run["resumed"] = train(resumed, range(SAVE_AFTER, STEPS))
    return run


def _body(rank, world_size, ckpt_dir):
    from olmo_core.distributed.checkpoint import load_model_and_optim_state
    from olmo_core.optim import OptimConfig
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from mano_dist import Mano
    from mano_dist.integrations.olmo_core import ManoConfig

    mesh = init_device_mesh("cpu", (world_size,))
    out = {"registered": OptimConfig.get_registered_class("mano") is ManoConfig}
    # The config as OLMo-core would decode it from a serialised experiment.
    config = OptimConfig.from_dict({"type": "mano", **CONFIG})
    out["decoded"] = type(config).__name__

    model = tiny_transformer()
    model.apply_fsdp(dp_mesh=mesh)
    optimizer = config.build(model)
    out["is_mano"] = isinstance(optimizer, Mano)
    out["sharded"] = all(isinstance(p, DTensor) for p in model.parameters())
    out["groups"] = [(g["algorithm"], g["weight_decay"], g["lr"], g["initial_lr"], g["momentum"], g["variant"],
                      tuple(g["adamw_betas"]), list(g["param_names"])) for g in optimizer.param_groups]
    out["params"] = _train(model, optimizer, rank, range(STEPS), save_after=SAVE_AFTER - 1, save_dir=ckpt_dir)

    # Resume: a different init, freshly parallelised and built (the same config object builds
    # again), then OLMo-core's DCP load of the checkpoint taken after SAVE_AFTER steps.
    model = tiny_transformer(seed=1)
    model.apply_fsdp(dp_mesh=mesh)
    optimizer = config.build(model)
    load_model_and_optim_state(ckpt_dir, model, optimizer)
    out["resumed_steps"] = [g["step"] for g in optimizer.param_groups]
    out["resumed"] = _train(model, optimizer, rank, range(SAVE_AFTER, STEPS))
    out["train_module"] = _train_module_run(rank, ckpt_dir + "-trainer")
    return out


def _reference():
    """Plain Mano, one process, unsharded model, the global batch; routed by mano_dist's own
    rule, the embeddings without weight decay (as the config's default)."""
    from mano_dist import Mano
    from mano_dist.param_groups import classify_parameters

    model = tiny_transformer()
    mano, adamw = classify_parameters(model)
    groups = [{"params": [p for _, p in mano], "algorithm": "mano"},
              {"params": [p for n, p in adamw if not n.startswith("embeddings.")], "algorithm": "adamw"},
              {"params": [p for n, p in adamw if n.startswith("embeddings.")], "algorithm": "adamw",
               "weight_decay": 0.0}]
    optimizer = Mano(groups, lr=CONFIG["lr"], weight_decay=CONFIG["weight_decay"], momentum=CONFIG["momentum"],
                     variant=CONFIG["variant"], adamw_betas=CONFIG["betas"])
    out = []
    for step in range(STEPS):
        loss_of(model, global_batch(step)).backward()
        optimizer.step()
        optimizer.zero_grad()
        out.append(full_params(model))
    return out, {n: "mano" for n, _ in mano} | {n: "adamw" for n, _ in adamw}


@pytest.mark.distributed
def test_mano_config_on_olmo_core_fsdp2_matches_one_process_and_resumes(tmp_path):
    results = run_distributed(_body, WORLD, tmp_path, str(tmp_path / "ckpt"), env=ENV, timeout=240)
    reference, routing = _reference()
    first = results[0]
    assert first["registered"] and first["decoded"] == "ManoConfig"
    assert first["is_mano"] and first["sharded"]
    got_routing = {}
    for algorithm, weight_decay, lr, initial_lr, momentum, variant, betas, names in first["groups"]:
        assert (lr, initial_lr, momentum, variant) == (0.02, 0.02, 0.9, "v2")
        assert betas == (0.9, 0.99)
        for name in names:
            got_routing[name] = algorithm
            assert weight_decay == (0.0 if name.startswith("embeddings.") else 0.05), name
    assert got_routing == routing  # OLMo-core's categorize_parameters == mano_param_groups' rule here
    assert routing["lm_head.w_out.weight"] == routing["embeddings.weight"] == "adamw"

    for result in results:
        for step, (got, want) in enumerate(zip(result["params"], reference)):
            for name in want:
                torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=f"{step} {name}")
        assert result["resumed_steps"] == [SAVE_AFTER] * len(first["groups"])
        for got, want in zip(result["resumed"], result["params"][SAVE_AFTER:]):
            for name in want:  # same ranks, same sums: bit-exact
                assert torch.equal(got[name], want[name]), name

        run = result["train_module"]
        assert run["type"] == "Mano" and run["mesh"] == ("dp",)
        for step, (got, want) in enumerate(zip(run["params"], reference)):
            for name in want:
                torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=f"{step} {name}")
        for got, want in zip(run["resumed"], run["params"][SAVE_AFTER:]):
            for name in want:
                assert torch.equal(got[name], want[name]), name
    assert max((reference[-1][n] - p).abs().max().item()
               for n, p in tiny_transformer().named_parameters()) > 1e-3  # it trained


def test_importing_mano_dist_imports_neither_olmo_core_nor_lightning():
    code = ("import sys, mano_dist, mano_dist.integrations, mano_dist.integrations.lightning; "
            "print(sorted(m for m in ('olmo_core', 'lightning', 'pytorch_lightning') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
