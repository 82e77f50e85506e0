"""A Flax NNX face for jaxllm's model: the pure params as an `nnx.Module`'s state.

`LanguageModel` holds exactly the params pytree that `model.init_params` or a checkpoint gives,
each array wrapped in an `nnx.Param`, in the same nested dicts under the same names: the state
of a `LanguageModel` is `{"embed": ..., "layers": {"wq": ..., ...}, "final_norm": ..., ...}`,
and `nnx.grad` gives gradients at those same paths. Its `__call__` is `model.forward` on those
arrays; nothing of the model is written a second time here. The config is a static attribute
(part of the module's graph definition, never a Variable), so `nnx.jit` treats it like `jax.jit`
treats a static argument.

    from flax import nnx
    import optax
    from jaxllm.nnx import LanguageModel

    model = LanguageModel(cfg, rngs=nnx.Rngs(0))            # init_params underneath
    optimizer = nnx.Optimizer(model, optax.adamw(3e-4), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, batch):                      # batch [B, T+1] token ids
        loss, grads = nnx.value_and_grad(lambda m: m.loss(batch))(model)
        optimizer.update(model, grads)
        return loss

    jaxllm.generate(model.params, model.cfg, ["Once"], tokenizer=tok)   # the plain pytree again

Flax is optional: importing `jaxllm` never imports it; this module does, and without it raises
an ImportError that says how to install it.
"""

from __future__ import annotations

from jaxllm.errors import JaxllmError


class FlaxMissing(JaxllmError, ImportError):
    """jaxllm.nnx was imported without Flax installed."""


try:
    from flax import nnx
except ImportError as e:
    raise FlaxMissing("jaxllm.nnx needs Flax, which is not installed: pip install 'jaxllm[flax]'") from e

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import model as pure
from jaxllm import training
from jaxllm.config import ModelConfig
from jaxllm.kvcache import KVCache

def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def _read(variable: nnx.Variable) -> jax.Array:
    return variable.get_value()


def _wrap(tree, path: str = ""):
    """A params (sub)tree -> the same nested dicts with each array in an `nnx.Param`.

    Only dicts and arrays are accepted: quantized weights and params laid out for decoding
    (a list of layers, kernel-tiled weights) are for the pure decoding functions, not for a module
    that trains.
    """
    if isinstance(tree, dict):
        return {k: _wrap(v, f"{path}.{k}" if path else k) for k, v in tree.items()}
    if isinstance(tree, (jax.Array, np.ndarray)):
        return nnx.Param(jnp.asarray(tree))
    raise JaxllmError(
        f"LanguageModel takes params as nested dicts of arrays, but {path or 'params'} is a "
        f"{type(tree).__name__} (quantized or decoding-prepared params run on the pure functions only)"
    )


class LanguageModel(nnx.Module):
    """jaxllm's decoder as an NNX module whose state is the pure params pytree.

    `LanguageModel(cfg, rngs=nnx.Rngs(0))` draws fresh params with `init_params` (from
    `rngs.params()`); `LanguageModel.from_params(params, cfg)` wraps params you have and
    `from_checkpoint(directory)` loads a jaxllm or Hugging Face directory. Whatever top-level keys
    and layer leaves the params hold (optional biases, an untied `lm_head`) become Params under
    the same names: nothing here lists them. `.params` gives the plain pytree back, for
    `jaxllm.generate`, `save_checkpoint` or `export_hf`.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs | None = None, params: dict | None = None):
        if (rngs is None) == (params is None):
            raise JaxllmError("LanguageModel needs exactly one of rngs= (fresh params) or params= (params you have)")
        if not isinstance(cfg, ModelConfig):
            raise JaxllmError(f"LanguageModel's cfg must be a jaxllm ModelConfig, got {type(cfg).__name__}")
        if params is None:
            params = pure.init_params(cfg, rngs.params())
        if not isinstance(params, dict):
            raise JaxllmError(f"LanguageModel takes params as a dict (init_params' tree), got {type(params).__name__}")
        for name in params:
            if not isinstance(name, str) or not name.isidentifier() or name.startswith("_") or hasattr(type(self), name) or name == "cfg":
                raise JaxllmError(f"params key {name!r} cannot be a LanguageModel attribute (it clashes with a name of the module)")
        self.cfg = cfg  # static: hashable, part of the graph definition
        self._param_names = tuple(params)  # static: which attributes are the params' top-level keys
        for name, subtree in params.items():
            setattr(self, name, nnx.data(_wrap(subtree, name)))  # a dict holding Variables must be marked as data

    @classmethod
    def from_params(cls, params: dict, cfg: ModelConfig) -> "LanguageModel":
        """Wraps existing params (from init_params, load_checkpoint, load_hf or a training run)."""
        return cls(cfg, params=params)

    @classmethod
    def from_checkpoint(cls, directory) -> tuple["LanguageModel", object]:
        """A jaxllm checkpoint or Hugging Face directory -> (model, tokenizer or None)."""
        from jaxllm.checkpoint import load_any

        params, cfg, tokenizer, _ = load_any(directory)
        return cls.from_params(params, cfg), tokenizer

    @property
    def params(self) -> dict:
        """The plain params pytree (the Params' current arrays, in the same nested dicts).

        Inside `nnx.jit`/`nnx.grad` the arrays are the traced values, so the pure functions called
        on them are traced along with the module."""
        return {
            name: jax.tree_util.tree_map(_read, getattr(self, name), is_leaf=_is_variable)
            for name in self._param_names
        }

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None, cache: KVCache | None = None):
        """tokens [B, T] int -> logits [B, T, V] float32; with a `cache`, -> (logits, updated cache).

        `positions` [B, T] default to 0..T-1 without a cache and to the cache's cursor onward with
        one, which is right for rows without padding; left-padded rows need their positions
        given (-1 for padding), as `model.forward` takes them.
        """
        tokens = jnp.asarray(tokens)
        if positions is None:
            start = 0 if cache is None else jnp.reshape(cache.cursor, (-1, 1))
            positions = jnp.broadcast_to(start + jnp.arange(tokens.shape[-1], dtype=jnp.int32), tokens.shape)
        logits, new_cache = pure.forward(self.params, self.cfg, tokens, positions, cache)
        return logits if cache is None else (logits, new_cache)

    def loss(self, batch: jax.Array) -> jax.Array:
        """batch [B, T+1] token ids -> mean next-token cross-entropy (`training.loss_fn`)."""
        return training.loss_fn(self.params, self.cfg, batch)
