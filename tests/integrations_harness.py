"""Shared pieces of the Transformers/Accelerate tests: a tiny LLaMA, learnable data, and the one
switch that lets Accelerate run FSDP2/DeepSpeed on CPU ranks.

Accelerate enables FSDP and DeepSpeed only on accelerator device types: on CPU it derives
``DistributedType.NO`` (or ``MULTI_CPU`` with ``cpu=True``) from the device and never shards.
:func:`accelerate_treats_cpu_as_accelerator` changes only that device detection (gloo ranks are
reported as a multi-GPU job whose device is ``cpu``); everything after it is the libraries' own
code, in their own order: ``Accelerator.prepare`` (``_prepare_fsdp2``: params swapped for
placeholders, ``fully_shard``, ``fsdp2_switch_optimizer_parameters``; ``_prepare_deepspeed``:
``deepspeed.initialize``), the Trainer's loop, ``save_state``/``load_state``.
"""

from __future__ import annotations

import os

import torch

VOCAB, SEQ = 80, 16  # a vocabulary unlike any hidden width (the head rule matches out_features == vocab)


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def counting_sequences(n: int) -> torch.Tensor:
    """``n`` sequences t, t+s, t+2s, ... (mod VOCAB): learnable, so the loss must fall."""
    g = torch.Generator().manual_seed(1234)
    start = torch.randint(0, VOCAB, (n, 1), generator=g)
    stride = torch.randint(1, 4, (n, 1), generator=g)
    return (start + stride * torch.arange(SEQ)) % VOCAB


class CountingDataset(torch.utils.data.Dataset):
    def __init__(self, n: int = 256):
        self.tokens = counting_sequences(n)

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, i):
        return {"input_ids": self.tokens[i], "labels": self.tokens[i]}


def accelerate_treats_cpu_as_accelerator() -> None:
    """Call in every rank before building an Accelerator/Trainer (see module docstring)."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    os.environ["ACCELERATE_TORCH_DEVICE"] = "cpu"
    PartialState._prepare_backend = lambda self, cpu, sagemaker_dp, backend: ("gloo", DistributedType.MULTI_GPU)


def set_rank_env(rank: int, world_size: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), LOCAL_SIZE=str(world_size),
                      MASTER_PORT=os.environ.get("MASTER_PORT", "29631"))


def reset_accelerate_state() -> None:
    """Accelerate keeps process-wide singletons; a second Trainer in one process needs a reset."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    PartialState._reset_state()


def full_params(model) -> dict[str, torch.Tensor]:
    """Every param as a full tensor (a collective under FSDP2: call on all ranks)."""
    out = {}
    for name, p in model.named_parameters():
        t = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[name.replace("_orig_mod.", "")] = t.detach().clone()
    return out
