"""Static model configuration: a frozen, hashable dataclass that `jit` can take as static.

Everything here decides shapes or structure. Values that change per request (temperature,
seeds, ...) live in pytrees of arrays instead (see sampling.py), so changing them never
recompiles.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from pathlib import Path
from typing import Any

from jaxllm.errors import ConfigError

DTYPES = ("float32", "bfloat16", "float16")
ROPE_SCALINGS = ("none", "linear", "ntk", "llama3")
POSITION_ENCODINGS = ("rope", "alibi")
ATTENTION_IMPLS = ("auto", "reference", "xla", "cudnn", "pallas")  # see attention.py
ACTIVATIONS = ("silu", "gelu", "gelu_tanh")  # the MLP's gate: SwiGLU, GeGLU (exact erf), GeGLU (tanh approximation)
# layer matrices LoRA can adapt (lora.py); biases, norms and embeddings are never adapted
LORA_TARGETS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
# model fields a fine-tune (`init_from`) may change: none alters the weights' shapes or meaning
FINETUNE_FIELDS = ("compute_dtype", "attention_impl", "max_seq_len")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A Llama-style decoder: RMSNorm, RoPE (or ALiBi), SwiGLU, grouped-query attention.

    The other families are options of the same decoder: Qwen2 is `qkv_bias=True`; Gemma is
    `activation="gelu_tanh"`, `embed_scale=True`, `norm_offset=1.0` (and a head_dim of its own).
    """

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_ff: int
    max_seq_len: int = 2048
    head_dim: int | None = None  # None: d_model // n_heads
    rope_theta: float = 10000.0
    # RoPE scaling for contexts longer than trained: "none", "linear" (position interpolation),
    # "ntk" (NTK-aware: a larger base), or "llama3" (frequency-dependent, Llama 3.1).
    rope_scaling: str = "none"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0  # llama3 only
    rope_high_freq_factor: float = 4.0  # llama3 only
    rope_original_max_len: int = 0  # llama3: the pre-training context; 0 = max_seq_len
    # "rope", or "alibi" (a per-head linear distance penalty on the scores; no rotation)
    position_encoding: str = "rope"
    sliding_window: int = 0  # > 0: each query sees only the last W keys, its own included (Mistral)
    attention_impl: str = "auto"  # which attention backend runs (a speed choice; the function is the same)
    norm_eps: float = 1e-5
    norm_offset: float = 0.0  # RMSNorm multiplies by (offset + weight): 1.0 for Gemma's (1 + w), whose weights start at 0
    activation: str = "silu"  # the MLP's gate nonlinearity, one of ACTIVATIONS (silu: SwiGLU; gelu*: GeGLU)
    qkv_bias: bool = False  # q/k/v projections add a bias (layers' bq, bk, bv; Qwen2)
    embed_scale: bool = False  # embeddings are multiplied by sqrt(d_model) (Gemma)
    tie_embeddings: bool = False
    param_dtype: str = "float32"  # how params are stored
    compute_dtype: str = "float32"  # matmul inputs; norms, softmax and logits stay float32

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in ("rope_theta", "rope_factor", "rope_low_freq_factor", "rope_high_freq_factor", "norm_eps", "norm_offset"):
            value = getattr(self, name)  # from a JSON file any type can arrive; a list here broke hashing in jit
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"{name} must be a finite number, got {value!r}")
        for name, low in (("head_dim", 1), ("rope_original_max_len", 0)):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise ConfigError(f"{name} must be an integer >= {low}{' or null' if name == 'head_dim' else ''}, got {value!r}")
        for name in ("tie_embeddings", "qkv_bias", "embed_scale"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ConfigError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads}) or head_dim set")
        if self.dim_per_head % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.dim_per_head}")
        if self.rope_theta <= 0 or self.norm_eps <= 0:
            raise ConfigError("rope_theta and norm_eps must be positive")
        if self.rope_scaling not in ROPE_SCALINGS:
            raise ConfigError(f"rope_scaling must be one of {', '.join(ROPE_SCALINGS)}, got {self.rope_scaling!r}")
        if self.rope_factor < 1:
            raise ConfigError(f"rope_factor must be >= 1, got {self.rope_factor}")
        if self.rope_scaling == "llama3" and not self.rope_high_freq_factor > self.rope_low_freq_factor > 0:
            raise ConfigError("llama3 rope scaling needs rope_high_freq_factor > rope_low_freq_factor > 0")
        if self.position_encoding not in POSITION_ENCODINGS:
            raise ConfigError(f"position_encoding must be one of {', '.join(POSITION_ENCODINGS)}, got {self.position_encoding!r}")
        if not isinstance(self.sliding_window, int) or isinstance(self.sliding_window, bool) or self.sliding_window < 0:
            raise ConfigError(f"sliding_window must be an integer >= 0 (0 = off), got {self.sliding_window!r}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ConfigError(f"attention_impl must be one of {', '.join(ATTENTION_IMPLS)}, got {self.attention_impl!r}")
        for name in ("param_dtype", "compute_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ConfigError(f"{name} must be one of {', '.join(DTYPES)}, got {getattr(self, name)!r}")

    @property
    def dim_per_head(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ModelConfig":
        """Builds a config, naming any unknown or missing field (one clear line, not a TypeError)."""
        _object(values, "model config")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise ConfigError(f"unknown model config field(s): {_names(unknown)}")
        required = [n for n, f in fields.items() if f.default is dataclasses.MISSING]
        missing = [n for n in required if n not in values]
        if missing:
            raise ConfigError(f"model config is missing field(s): {', '.join(missing)}")
        return cls(**values)

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        """Reads a JSON file: either the config itself or a preset with a "model" section."""
        path = Path(path)
        try:
            values = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read config {path}: {e}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"config {path} must hold a JSON object")
        return cls.from_dict(values.get("model", values))


def _object(values, what: str) -> None:
    """A config section read from JSON must be an object: a list or number there would be iterated
    as field names (a list of nulls raised AttributeError; found by fuzzing config.json)."""
    if not isinstance(values, dict):
        raise ConfigError(f"{what} must be a JSON object, got {type(values).__name__}")


def _names(names) -> str:
    """Names from a file or the command line, for an error message of one line: quoted when they
    hold a line break or another unprintable character."""
    return ", ".join(n if n.isprintable() else repr(n) for n in names)


# ---------------------------------------------------------------------------- training


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How to train: data, optimizer, schedule, evaluation, checkpoints, device mesh.

    Sentinels instead of None keep every field typed for command-line overrides:
    "" means "not given" for strings, 0 means "off" or "derive it" where noted.
    """

    # data
    data: str = "stdlib"  # "stdlib" (Python's own library source), or comma-separated files/dirs/globs
    data_limit_mb: float = 0.0  # read at most this many MB of the corpus (seeded document order); 0 = all
    data_dir: str = ""  # where token shards go; "" = OUT_DIR/data
    tokenizer: str = ""  # a tokenizer.model or tokenizer.json (or a directory with one) to use; "" = train one on the corpus (vocab = model.vocab_size)
    # fine-tuning
    init_from: str = ""  # a jaxllm checkpoint or HF directory to start from (its config and tokenizer); "" = random init
    lora_rank: int = 0  # > 0: train rank-R LoRA adapters on the frozen init_from model; 0 = train every weight
    lora_alpha: float = 0.0  # adapters are scaled by lora_alpha / lora_rank; 0 = 2 * lora_rank (a scale of 2)
    lora_targets: str = ",".join(LORA_TARGETS)  # comma-separated layer matrices the adapters apply to
    val_fraction: float = 0.02  # share of corpus bytes held out, by whole documents
    seq_len: int = 0  # tokens per training window; 0 = model.max_seq_len
    # optimization
    batch_size: int = 32  # sequences per optimizer step, across all devices and hosts
    grad_accum: int = 1  # micro-batches per step (batch_size must divide by it)
    max_steps: int = 1000
    max_minutes: float = 0.0  # stop (evaluate, save) once the run is this old; 0 = no limit
    lr: float = 1e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at max_steps
    warmup_steps: int = 100
    weight_decay: float = 0.1  # on matrices only; norms are never decayed
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0  # global-norm clipping; 0 = off
    seed: int = 0  # params init and batch order
    # evaluation, logging, checkpoints
    eval_every: int = 200  # steps between validation evals (and at the end); 0 = only at the end
    eval_batches: int = 8  # batches of batch_size windows per eval, spread evenly over the val split
    log_every: int = 10  # steps between metrics lines (and NaN checks)
    save_every: int = 500  # steps between checkpoints (and at the end); 0 = only at the end
    keep: int = 3  # most recent checkpoints kept under OUT_DIR/state, besides the best by val loss
    # devices
    fsdp: int = 1  # size of the mesh's fsdp axis (params sharded over it); data axis = devices // fsdp

    def __post_init__(self):
        positive = ("batch_size", "grad_accum", "max_steps", "eval_batches", "log_every", "keep", "fsdp")
        non_negative = ("seq_len", "warmup_steps", "seed", "eval_every", "save_every", "lora_rank")
        for name in positive + non_negative:
            value = getattr(self, name)
            low = 1 if name in positive else 0
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.seed >= 2**63:  # jax.random.key takes an int64
            raise ConfigError(f"seed must be < 2**63, got {self.seed}")
        for name, low, high in (
            ("lr", 0.0, 1.0),
            ("min_lr_ratio", 0.0, 1.0),
            ("weight_decay", 0.0, 10.0),
            ("beta1", 0.0, 1.0),
            ("beta2", 0.0, 1.0),
            ("adam_eps", 0.0, 1.0),
            ("grad_clip", 0.0, float("inf")),
            ("data_limit_mb", 0.0, float("inf")),
            ("max_minutes", 0.0, float("inf")),
            ("lora_alpha", 0.0, float("inf")),
        ):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
                raise ConfigError(f"{name} must be a number in [{low}, {high}], got {value!r}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in (0, 1), got {self.val_fraction!r}")
        if self.lr == 0.0:
            raise ConfigError("lr must be > 0")
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"batch_size ({self.batch_size}) must be a multiple of grad_accum ({self.grad_accum})")
        if not self.data:
            raise ConfigError('data must name a corpus ("stdlib", or files/dirs/globs)')
        for name in ("init_from", "lora_targets"):
            if not isinstance(getattr(self, name), str):
                raise ConfigError(f"{name} must be a string, got {getattr(self, name)!r}")
        if self.init_from and self.tokenizer:
            raise ConfigError("tokenizer cannot be combined with init_from: a fine-tune uses the tokenizer of its init_from model")
        if self.lora_rank and not self.init_from:
            raise ConfigError("lora_rank needs init_from: LoRA adapts an existing model (a jaxllm checkpoint or HF directory)")
        targets = self.lora_target_names
        unknown = [t for t in targets if t not in LORA_TARGETS]
        if unknown or not targets or len(set(targets)) != len(targets):
            what = f"unknown target(s) {_names(unknown)}" if unknown else "no target" if not targets else "a target named twice"
            raise ConfigError(f"lora_targets: {what} in {self.lora_targets!r} (choose from {', '.join(LORA_TARGETS)})")

    @property
    def lora_target_names(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())

    @property
    def lora_scale(self) -> float:
        """alpha / rank, the factor on the adapters' product A @ B (alpha 0 means 2 * rank)."""
        return (self.lora_alpha or 2.0 * self.lora_rank) / self.lora_rank if self.lora_rank else 0.0

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        _object(values, "train config")
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f"unknown train config field(s): {_names(unknown)}")
        # JSON has one number type: accept 3 for a float field, never 3.5 for an int field.
        fixed = {}
        for f in dataclasses.fields(cls):
            if f.name in values:
                value = values[f.name]
                if isinstance(f.default, float) and isinstance(value, int) and not isinstance(value, bool):
                    value = float(value)
                fixed[f.name] = value
        return cls(**fixed)


PRESET_KEYS = ("description", "_comment", "model", "train")


def load_preset(path: str | Path) -> tuple[ModelConfig, TrainConfig, str]:
    """A preset file -> (model config, train config, its description).

    {"description": "...", "model": {...ModelConfig...}, "train": {...TrainConfig...}}
    """
    model, train, description = read_preset(path)
    if model is None:
        raise ConfigError(f'config {path} must be a JSON object with a "model" section')
    try:
        return ModelConfig.from_dict(model), TrainConfig.from_dict(train), description
    except ConfigError as e:
        raise ConfigError(f"config {path}: {e}") from None


def read_preset(path: str | Path) -> tuple[dict | None, dict, str]:
    """A preset file -> (its "model" section, or None without one; its "train" section; the
    description), the sections as dicts still to be checked: a fine-tune (`init_from`) takes
    its model from elsewhere, so there the model section is optional and checked against that
    model (`finetune_config`), and train fields may depend on ones the command line adds
    (`preset_train_config`)."""
    path = Path(path)
    try:
        values = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read config {path}: {e}") from None
    if not isinstance(values, dict) or not isinstance(values.get("model", {}), dict):
        raise ConfigError(f'config {path} must be a JSON object with a "model" section')
    unknown = sorted(set(values) - set(PRESET_KEYS))
    if unknown:
        raise ConfigError(f"config {path}: unknown section(s) {_names(unknown)} (allowed: {', '.join(PRESET_KEYS)})")
    train = values.get("train", {})
    if not isinstance(train, dict):
        raise ConfigError(f'config {path}: "train" must be a JSON object')
    return values.get("model"), train, values.get("description", "")


def preset_train_config(path: str | Path, values: dict, changes: dict[str, Any]) -> TrainConfig:
    """A preset's train section with `changes` (from `split_overrides`) applied. An error the
    section has on its own names the file; one only the changes bring is the command line's."""
    try:
        return TrainConfig.from_dict({**values, **changes})
    except ConfigError as e:
        try:
            TrainConfig.from_dict(values)
        except ConfigError:
            raise ConfigError(f"config {path}: {e}") from None
        raise


def finetune_config(base: ModelConfig, changes: dict[str, Any] | ModelConfig | None, where: str = "init_from") -> ModelConfig:
    """The config a fine-tune of a model with config `base` trains: `base`, with `changes` (model
    fields from a preset's "model" section or the command line, or a whole ModelConfig) applied
    where they are among FINETUNE_FIELDS. Any other field that differs from `base` would change
    the weights' shapes or meaning: it is refused by name (`where` says what fixed it)."""
    if changes is None:
        return base
    if isinstance(changes, ModelConfig):
        changes = changes.to_dict()
    _object(changes, "model config")
    unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(ModelConfig)})
    if unknown:
        raise ConfigError(f"unknown model config field(s): {_names(unknown)}")
    out = base.replace(**{k: v for k, v in changes.items() if k in FINETUNE_FIELDS})
    if out.rope_scaling == "llama3" and not base.rope_original_max_len and out.max_seq_len != base.max_seq_len:
        out = out.replace(rope_original_max_len=base.max_seq_len)  # llama3 frequencies depend on it: keep them
    fixed = out.to_dict()
    clash = [k for k, v in changes.items() if k not in FINETUNE_FIELDS and v != fixed[k]]
    if clash:
        said = ", ".join(f"{k}={changes[k]!r} (the model has {fixed[k]!r})" for k in clash)
        raise ConfigError(f"{where} fixes the model config: {said}; a fine-tune may change only {', '.join(FINETUNE_FIELDS)}")
    return out


# ---------------------------------------------------------------------------- command-line overrides


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


_PARSERS = {int: int, float: float, str: str, bool: _parse_bool}


def _parse(name: str, text: str, kind) -> Any:
    """One override value, typed by the dataclass annotation (never eval'd)."""
    args = typing.get_args(kind)
    if type(None) in args:  # Optional[X]: "none" / "null" give None
        if text.lower() in ("none", "null"):
            return None
        kind = next(a for a in args if a is not type(None))
    try:
        return _PARSERS[kind](text)
    except ValueError:
        raise ConfigError(f"--{name} expects {kind.__name__}, got {text!r}") from None


def apply_overrides(
    model: ModelConfig, train: TrainConfig, args: list[str]
) -> tuple[ModelConfig, TrainConfig]:
    """Applies `--field=value` / `--field value` pairs to whichever config owns the field.

    Values are parsed by each field's declared type; an unknown field, a missing value or
    a value of the wrong type raises ConfigError naming it.
    """
    model_changes, train_changes = split_overrides(args)
    return model.replace(**model_changes), train.replace(**train_changes)


def split_overrides(args: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """`--field=value` / `--field value` pairs -> ({model field: value}, {train field: value}),
    each value parsed by its field's type (see `apply_overrides`)."""
    model_types, train_types = typing.get_type_hints(ModelConfig), typing.get_type_hints(TrainConfig)
    model_changes: dict[str, Any] = {}
    train_changes: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"unexpected argument {arg!r} (overrides look like --field=value)")
        name, eq, value = arg[2:].partition("=")
        name = name.replace("-", "_")
        if not eq:
            if i + 1 >= len(args):
                raise ConfigError(f"--{name} needs a value")
            value, i = args[i + 1], i + 1
        i += 1
        if name in model_types:
            model_changes[name] = _parse(name, value, model_types[name])
        elif name in train_types:
            train_changes[name] = _parse(name, value, train_types[name])
        else:
            raise ConfigError(f"unknown config field {_names(['--' + name])}")
    return model_changes, train_changes
