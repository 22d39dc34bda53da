"""Shared pieces of the PyTorch Lightning tests: a tiny LM, learnable data, a LightningModule that
shards itself with FSDP2 in ``configure_model`` and returns Mano from ``configure_optimizers``.

No Lightning code is patched for the ``ModelParallelStrategy`` runs: on CPU, Lightning's own
``Trainer(accelerator="cpu", devices=2, strategy=ModelParallelStrategy(...))`` picks gloo and a
``cpu`` device mesh. The ranks are started by ``tests.dist.run_distributed`` (which initialises
the gloo group); with ``LOCAL_RANK`` set Lightning's ``LightningEnvironment`` reports that
processes are created externally, so the Trainer launches nothing and joins the existing group
(``_init_dist_connection`` skips an initialised one). :func:`set_rank_env` sets those variables.

The one adjustment, for the unit-level DeepSpeedStrategy test only (the Trainer cannot start that
strategy without CUDA): :func:`deepspeed_strategy_on_cpu_ranks`, indexed ``cpu:<rank>`` devices.
"""

from __future__ import annotations

import os

import torch
from torch import nn

VOCAB, SEQ, DIM, HIDDEN = 48, 8, 16, 32  # vocabulary unlike any hidden width (head rule: out == vocab)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        self.up = nn.Linear(DIM, HIDDEN, bias=False)
        self.down = nn.Linear(HIDDEN, DIM, bias=False)

    def forward(self, x):
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))


class TinyLM(nn.Module):
    """Embedding, 2 residual MLP blocks, a final norm and a head: Mano gets the 4 block matrices."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def tiny_lm(seed: int = 0) -> TinyLM:
    torch.manual_seed(seed)
    return TinyLM()


def lm_loss(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))


def counting_sequences(n: int) -> torch.Tensor:
    """``n`` sequences t, t+s, t+2s, ... (mod VOCAB): learnable, so the loss must fall."""
    g = torch.Generator().manual_seed(1234)
    start = torch.randint(0, VOCAB, (n, 1), generator=g)
    stride = torch.randint(1, 4, (n, 1), generator=g)
    return (start + stride * torch.arange(SEQ)) % VOCAB


def set_rank_env(rank: int, world_size: int) -> None:
    """What a launcher (torchrun) would set; Lightning reads LOCAL_RANK/NODE_RANK/WORLD_SIZE."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), NODE_RANK="0",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29641"))


def full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every param as a full tensor (a collective under FSDP2: call on all ranks)."""
    out = {}
    for name, p in model.named_parameters():
        t = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[name] = t.detach().clone()
    return out


def lightning_classes():
    """The LightningModule and the recording callback (built lazily: Lightning is imported here)."""
    import pytorch_lightning as pl
    from torch.distributed.fsdp import fully_shard

    from mano_dist.integrations.lightning import mano_optimizer

    class ManoLM(pl.LightningModule):
        def __init__(self, seed: int = 0, **mano_kwargs):
            super().__init__()
            self.model = tiny_lm(seed)
            self.mano_kwargs = mano_kwargs

        def configure_model(self):
            mesh = self.device_mesh["data_parallel"]
            for block in self.model.blocks:
                fully_shard(block, mesh=mesh)
            fully_shard(self.model, mesh=mesh)

        def training_step(self, batch, batch_idx):
            (tokens,) = batch
            return lm_loss(self.model, tokens)

        def configure_optimizers(self):
            return mano_optimizer(self, **self.mano_kwargs)

    class Recorder(pl.Callback):
        """Full params after every optimizer step (all ranks gather)."""

        def __init__(self):
            self.params = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.params.append(full_params(pl_module.model))

    return ManoLM, Recorder


def dataloader(n: int, micro_batch: int):
    tokens = counting_sequences(n)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(tokens), batch_size=micro_batch,
                                       shuffle=False)


def deepspeed_strategy_on_cpu_ranks(strategy, world_size: int) -> None:
    """Give ``DeepSpeedStrategy`` indexed CPU devices. Its ``_setup_model_and_optimizer`` passes
    ``root_device.index`` to DeepSpeed as ``device_rank``, which DeepSpeed compares with 0: ``None``
    for a plain ``cpu`` device fails (on CUDA the index is the GPU's). ``cpu:<rank>`` is the same
    device; nothing else changes."""
    strategy.parallel_devices = [torch.device("cpu", i) for i in range(world_size)]
