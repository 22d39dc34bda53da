"""A LLaMA-style decoder (RMSNorm, RoPE, SwiGLU, untied embedding and head, init std 0.02).

Module names follow torchtitan/LLaMA (``tok_embeddings``, ``layers.N.attention.wq``,
``feed_forward.w1/w2/w3``, ``norm``, ``output``) so ``mano_param_groups`` routes the embedding and
the ``output`` head to AdamW by type and name. Builds on the meta device for planning.

``build_model`` is how the trainer (and the dry run) get a model: built on the meta device,
parallelised, then each rank allocates and initialises only its own shards. Every parameter
draws from its own generator seeded by (``train.seed``, its name), so the initial weights are the
same bits at every world size and tensor-parallel degree, and no rank ever holds the full model
(only one full parameter at a time, while its shard is cut out).
"""

from __future__ import annotations

import zlib

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_tables(head_dim: int, seq_len: int, theta: float = 10000.0, device=None):
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    angles = torch.outer(torch.arange(seq_len, device=device).float(), freqs)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """x: (batch, seq, heads, head_dim); rotate pairs (even, odd)."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    cos, sin = cos[: x.shape[1]][None, :, None, :], sin[: x.shape[1]][None, :, None, :]
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.dim // cfg.n_heads
        self.wq = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin):
        b, s, _ = x.shape
        q = apply_rope(self.wq(x).view(b, s, -1, self.head_dim), cos, sin)
        k = apply_rope(self.wk(x).view(b, s, -1, self.head_dim), cos, sin)
        v = self.wv(x).view(b, s, -1, self.head_dim)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)  # gate
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)  # up
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)  # down

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x, cos, sin):
        x = x + self.attention(self.attention_norm(x), cos, sin)
        return x + self.feed_forward(self.ffn_norm(x))


class Llama(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg.dim // cfg.n_heads, cfg.max_seq_len)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, init_std) for every matrix, ones for norm gains (the paper's LLaMA setup)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        if self.rope_cos.device.type != "meta":
            cos, sin = rope_tables(self.cfg.dim // self.cfg.n_heads, self.cfg.max_seq_len, device=self.rope_cos.device)
            self.rope_cos.copy_(cos)
            self.rope_sin.copy_(sin)

    def forward(self, tokens):
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, self.rope_cos, self.rope_sin)
        return self.output(self.norm(h))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")


def canonical_name(name: str) -> str:
    """A parameter's name without activation-checkpoint / compile wrapper prefixes."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def parameter_seed(seed: int, name: str) -> int:
    """The generator seed of one parameter: the run's seed and a stable hash of its name."""
    return (seed % 2**31) * 2**32 + zlib.crc32(canonical_name(name).encode())


def initial_value(module: nn.Module, name: str, shape, seed: int, init_std: float) -> torch.Tensor:
    """The full fp32 initial value of one parameter, on the CPU (the same bits on every machine):
    Normal(0, init_std) for matrices (linear and embedding), ones for norm gains."""
    if isinstance(module, RMSNorm):
        return torch.ones(shape)
    g = torch.Generator().manual_seed(parameter_seed(seed, name))
    return torch.empty(shape).normal_(0.0, init_std, generator=g)


@torch.no_grad()
def init_weights(model: nn.Module, seed: int) -> None:
    """Initialise every parameter in place, each rank writing only its local shard."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    for mod_name, module in model.named_modules():
        for p_name, param in module.named_parameters(recurse=False):
            full = initial_value(module, f"{mod_name}.{p_name}", param.shape, seed, model.cfg.init_std)
            if isinstance(param, DTensor):
                local = distribute_tensor(full.to(param.device), param.device_mesh, param.placements,
                                          src_data_rank=None).to_local()
                param.to_local().copy_(local)
            else:
                param.copy_(full)
    cos, sin = rope_tables(model.cfg.dim // model.cfg.n_heads, model.cfg.max_seq_len, device=model.rope_cos.device)
    model.rope_cos.copy_(cos)
    model.rope_sin.copy_(sin)


def build_model(cfg, mesh, device, *, shard: bool = True) -> Llama:
    """The model the trainer runs: built on meta, ``parallelize``d (TP, activation checkpointing,
    compile, FSDP2 from ``cfg.train``/``cfg.parallel``), then materialised on ``device`` with
    each rank initialising only its shards. ``shard=False`` leaves sharding to DeepSpeed."""
    from .parallel import parallelize

    with torch.device("meta"):
        model = Llama(cfg.model)
    model = parallelize(model, mesh, cfg, shard=shard)
    model.to_empty(device=device)
    init_weights(model, cfg.train.seed)
    return model
