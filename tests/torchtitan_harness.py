"""Shared pieces of the torchtitan tests: CPU patches, offline assets, a tiny LLaMA and a Trainer
that records what it did.

torchtitan 0.3.0 targets CUDA and torch nightly. Its own code runs unchanged here except for the
four switches below, each a small function named for its reason (tests only, never the
library); call :func:`patch_torchtitan_for_cpu_gloo` in every rank before building a Trainer:

- :func:`report_cpu_as_torchtitan_device`: torchtitan picks ``device_type = "cuda"`` when no
  accelerator is found (``tools/utils.py``), so meshes, ``set_device`` and ``init_weights``
  target CUDA.
- :func:`run_flex_attention_as_masked_sdpa`: the LLaMA attention is FlexAttention (behind a
  class-level ``torch.compile(flex_attention, max_autotune=True)``), and torch 2.13 refuses its
  backward on CPU, compiled or eager ("FlexAttention does not support backward on CPU"). The
  stand-in computes the same masked attention with ``scaled_dot_product_attention``.
- :func:`add_missing_set_timeout`: ``torch.distributed.set_timeout`` (called unconditionally
  by ``set_pg_timeouts`` after the first step of every run) exists on torch nightly only, not
  on 2.13 (``AttributeError``; this breaks GPU runs on 2.13 too).
- :func:`sum_gradients_without_premul_sum`: torchtitan sums gradients over data-parallel ranks
  (``set_gradient_divide_factor(1.0)``; the loss is already divided by the global token count),
  which FSDP2 does with ``ReduceOp.PREMUL_SUM(1.0)``; gloo has no PREMUL_SUM. FSDP2's
  ``set_force_sum_reduction_for_comms(True)`` does the same sum with ``ReduceOp.SUM``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import torch

VOCAB, DIM, N_LAYERS, N_HEADS, N_KV_HEADS, HIDDEN, SEQ = 96, 64, 2, 4, 2, 128, 32
HEAD_DIM = DIM // N_HEADS


# ------------------------------------------------------------------ CPU / torch 2.13 / gloo patches
class _CpuDeviceModule:
    """``torch.cpu`` plus the ``torch.cuda`` calls torchtitan makes on its device module
    (``set_device``, the memory monitor's ``get_device_name``/``memory_stats``/...)."""

    def __getattr__(self, name):
        return getattr(torch.cpu, name)

    @staticmethod
    def get_device_name(device=None):
        return "cpu"

    @staticmethod
    def get_device_properties(device=None):
        import types

        return types.SimpleNamespace(name="cpu", total_memory=2**30)

    @staticmethod
    def memory_stats(device=None):
        return {}

    @staticmethod
    def reset_peak_memory_stats(device=None):
        pass

    @staticmethod
    def empty_cache():
        pass

    @staticmethod
    def current_device():
        return 0

    @staticmethod
    def device_count():
        return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def report_cpu_as_torchtitan_device() -> None:
    """See module docstring. Rebinds ``device_type``/``device_module`` in every torchtitan module
    that copied them at import (``from torchtitan.tools.utils import device_type``); the device
    module is ``torch.cpu`` with the few CUDA-only calls torchtitan makes answered for a CPU."""
    import torchtitan.tools.utils as tt_utils

    cpu = _CpuDeviceModule()
    for module in [tt_utils, *(m for n, m in list(sys.modules.items()) if n.startswith("torchtitan") and m)]:
        if getattr(module, "device_type", None) == "cuda":
            module.device_type = "cpu"
        if getattr(module, "device_module", None) is torch.cuda:
            module.device_module = cpu


def run_flex_attention_as_masked_sdpa() -> None:
    """See module docstring. The BlockMask's ``mask_mod`` (causal within each document) is
    evaluated densely and handed to ``scaled_dot_product_attention``: the same attention, with
    a backward on CPU (tiny sequences only: the mask is B x L x L)."""
    import torch.nn.functional as F
    from torch.nn.attention.flex_attention import AuxOutput, create_mask
    from torchtitan.models.common.attention import FlexAttention

    def flex_attention_as_sdpa(q, k, v, *, score_mod=None, block_mask=None, scale=None, enable_gqa=False,
                               return_aux=None, kernel_options=None):
        if score_mod is not None or (return_aux is not None and return_aux.lse):
            raise NotImplementedError("the CPU stand-in for FlexAttention covers mask_mod only")
        mask = create_mask(block_mask.mask_mod, q.shape[0], 1, q.shape[-2], k.shape[-2], device=q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=enable_gqa), AuxOutput()

    FlexAttention._compiled_flex_attn = staticmethod(flex_attention_as_sdpa)


def add_missing_set_timeout() -> None:
    """See module docstring. torch 2.13 has the same operation, private:
    ``distributed_c10d._set_pg_timeout(timeout, group)`` (gloo and NCCL)."""
    if not hasattr(torch.distributed, "set_timeout"):
        from torch.distributed.distributed_c10d import _set_pg_timeout

        torch.distributed.set_timeout = _set_pg_timeout


def sum_gradients_without_premul_sum() -> None:
    """See module docstring."""
    import torchtitan.distributed.fsdp as tt_fsdp
    from torch.distributed._composable.fsdp import FSDPModule

    def disable_fsdp_gradient_division(model):
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_gradient_divide_factor(1.0)
                module.set_force_sum_reduction_for_comms(True)

    tt_fsdp.disable_fsdp_gradient_division = disable_fsdp_gradient_division


def patch_torchtitan_for_cpu_gloo() -> None:
    report_cpu_as_torchtitan_device()
    run_flex_attention_as_masked_sdpa()
    add_missing_set_timeout()
    sum_gradients_without_premul_sum()


# ------------------------------------------------------------------ offline tokenizer and text
def write_assets(folder: str) -> tuple[str, str]:
    """A byte-level BPE ``tokenizer.json`` (+ ``tokenizer_config.json`` naming BOS/EOS) trained on
    a generated text, and that text as a local JSON-lines dataset with a ``text`` field (the
    layout ``HuggingFaceTextDataLoader``'s ``c4_test`` loader reads). Returns (assets, dataset)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    assets, data = os.path.join(folder, "tokenizer"), os.path.join(folder, "text")
    os.makedirs(assets, exist_ok=True)
    os.makedirs(data, exist_ok=True)
    g = torch.Generator().manual_seed(7)
    words = ["alpha", "beta", "gamma", "delta", "mano", "titan", "shard", "row", "column", "step"]
    docs = [" ".join(words[int(i)] for i in torch.randint(0, len(words), (int(n),), generator=g))
            for n in torch.randint(20, 60, (64,), generator=g)]
    with open(os.path.join(data, "train.jsonl"), "w") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}) + "\n")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<s>", "</s>"]))
    tokenizer.save(os.path.join(assets, "tokenizer.json"))
    with open(os.path.join(assets, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True, "add_eos_token": True}, f)
    return assets, data


# ------------------------------------------------------------------ model and trainer configs
def tiny_llama_config(vocab: int = VOCAB):
    """torchtitan's LLaMA 3 built the way its ``debugmodel`` is (``_build_llama3_layers``: fused
    QKV, FlexAttention), shrunk: 2 layers, dim 64, 4 query heads sharing 2 KV heads."""
    from functools import partial

    from torch import nn
    from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm
    from torchtitan.models.llama3 import Llama3Model, _build_llama3_layers

    init = {"weight": partial(nn.init.trunc_normal_, std=0.2)}
    return Llama3Model.Config(
        dim=DIM, vocab_size=vocab,
        tok_embeddings=Embedding.Config(num_embeddings=vocab, embedding_dim=DIM, param_init=init),
        norm=RMSNorm.Config(normalized_shape=DIM, param_init={"weight": nn.init.ones_}),
        lm_head=Linear.Config(in_features=DIM, out_features=vocab, param_init=init),
        layers=_build_llama3_layers(
            n_layers=N_LAYERS, dim=DIM, n_heads=N_HEADS, n_kv_heads=N_KV_HEADS, hidden_dim=HIDDEN, fuse_qkv=True,
            rope=ComplexRoPE.Config(dim=HEAD_DIM, max_seq_len=SEQ, theta=10000, scaling="none"),
            attn_backend="flex"),
    )


def tiny_trainer_config(folder: str, *, steps: int, lr: float, checkpoint_interval: int | None = None,
                        load_step: int = -1, local_batch_size: int = 2):
    """The shipped config function ``mano_llama3_debugmodel`` with the tiny model, the offline
    assets in ``folder``, fp32 and no gradient clipping (so one process can reproduce it), and
    torchtitan's DCP checkpointer every ``checkpoint_interval`` steps."""
    from torchtitan.components.checkpoint import CheckpointManager

    from mano_dist.integrations.torchtitan import mano_optimizer_config
    from mano_dist.integrations.torchtitan_configs import mano_llama3_debugmodel

    assets, data = os.path.join(folder, "tokenizer"), os.path.join(folder, "text")
    config = mano_llama3_debugmodel()
    config.model_spec = dataclasses.replace(config.model_spec, model=tiny_llama_config())
    config.optimizer = mano_optimizer_config(config.model_spec.model, lr=lr, weight_decay=0.05, variant="v2")
    config.loss.loss_fn.global_vocab_size = VOCAB
    config.hf_assets_path = assets
    config.dataloader.dataset_path = data
    config.dump_folder = os.path.join(folder, "dump")
    config.training.steps = steps
    config.training.seq_len = SEQ
    config.training.local_batch_size = local_batch_size
    config.training.mixed_precision_param = "float32"
    # torchtitan's default "spmd_types" backend needs torch nightly: 2.13's fully_shard does not
    # turn its SPMD annotations into DTensors ("When dp_mesh_dims is provided, all parameters must
    # be DTensors"). "partial_dtensor" is plain FSDP2 (+ DTensor TP).
    config.parallelism.spmd_backend = "partial_dtensor"
    config.training.max_norm = 1e9  # clip factor exactly 1.0: the reference does not clip
    config.training.disable_cuda_graphs = True
    config.validator.enable = False
    config.metrics.log_freq = 1
    config.checkpoint = CheckpointManager.Config(
        enable=checkpoint_interval is not None, interval=checkpoint_interval or 10**6,
        folder="checkpoint", last_save_model_only=False, load_step=load_step)
    return recording(config)


def recording(config):
    """``config`` as a ``RecordingTrainer`` config (``config.build()`` builds that)."""
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init}
    return recording_trainer_class().Config(**fields)


_RECORDING_TRAINER = []


def recording_trainer_class():
    """The :class:`RecordingTrainer` class (built on first use: it subclasses torchtitan's)."""
    if _RECORDING_TRAINER:
        return _RECORDING_TRAINER[0]
    from torchtitan.trainer import Trainer

    class RecordingTrainer(Trainer):
        """torchtitan's Trainer, unchanged, that also records per step: the batch each rank
        trained on, the lr of every optimizer group, and the full params after the step
        (``records``); ``initial_params`` are the params before the first step."""

        @dataclasses.dataclass(kw_only=True, slots=True)
        class Config(Trainer.Config):
            pass

        def train(self):
            self.initial_params = full_params(self.model_parts[0])
            self.records = []
            return super().train()

        def train_step(self, data_iterator):
            batches = []

            def recorded():
                for input_dict, labels in data_iterator:
                    batches.append(({k: v.clone() for k, v in input_dict.items()}, labels.clone()))
                    yield input_dict, labels

            lrs = [g["lr"] for opt in self.optimizers for g in opt.param_groups]
            out = super().train_step(recorded())
            self.records.append({"step": self.step, "batches": batches, "lrs": lrs,
                                 "params": full_params(self.model_parts[0])})
            return out

    _RECORDING_TRAINER.append(RecordingTrainer)
    return RecordingTrainer


def full_params(model) -> dict[str, torch.Tensor]:
    """Every param as a full tensor under its canonical name (a collective: call on all ranks)."""
    from torchtitan.components.checkpointer.utils import canonical_fqn

    return {canonical_fqn(n): (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in model.named_parameters()}
