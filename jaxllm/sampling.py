"""Choosing the next token: per-row sampling values as a pytree of arrays.

Every value is a traced [B] array, so one batch can mix settings and changing a value
never recompiles. Each row has its own PRNG stream (its seed folded with the step), so a
row's output depends only on its own prompt, settings and seed — not on its batch mates.

`choose_next` is the single place the decode loop asks for a token.
"""

from __future__ import annotations

import dataclasses
import functools
import secrets
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.errors import GenerationError


@functools.partial(jax.tree_util.register_dataclass, data_fields=["temperature", "seed"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: jax.Array  # [B] float32; 0 = greedy (argmax), not a division
    seed: jax.Array  # [B] uint32; a row's stream is fold_in(key(seed), step)

    @classmethod
    def make(
        cls,
        batch: int,
        temperature: float | Sequence[float] = 1.0,
        seed: int | Sequence[int] | None = None,
    ) -> "SamplingParams":
        """Broadcasts scalars (or checks per-row lists) to [batch] arrays and validates them.

        `seed=None` draws a fresh random seed (shared by the rows of this call).
        """
        temperature = _per_row("temperature", temperature, batch, np.float32)
        if np.any(~np.isfinite(temperature)) or np.any(temperature < 0):
            raise GenerationError(f"temperature must be >= 0 (0 = greedy), got {temperature.tolist()}")
        if seed is None:
            seed = secrets.randbelow(2**32)
        seeds = _per_row("seed", seed, batch, np.int64)
        if np.any(seeds < 0):
            raise GenerationError(f"seed must be >= 0, got {seeds.tolist()}")
        return cls(temperature=jnp.asarray(temperature), seed=jnp.asarray(seeds % 2**32, jnp.uint32))


def _per_row(name: str, value, batch: int, dtype) -> np.ndarray:
    arr = np.asarray(value, dtype=dtype)
    if arr.ndim == 0:
        return np.full((batch,), arr, dtype)
    if arr.shape != (batch,):
        raise GenerationError(f"{name} must be a scalar or one value per row ({batch}), got shape {arr.shape}")
    return arr


def row_keys(sampling: SamplingParams, step: jax.Array) -> jax.Array:
    """One PRNG key per row for this step: [B] typed keys."""
    return jax.vmap(lambda s: jax.random.fold_in(jax.random.key(s), step))(sampling.seed)


def choose_next(logits: jax.Array, sampling: SamplingParams, step: jax.Array) -> jax.Array:
    """logits: [B, V] float32 -> next token ids [B] int32 (greedy where temperature == 0)."""
    t = sampling.temperature
    scaled = logits / jnp.where(t > 0, t, 1.0)[:, None]
    sampled = jax.vmap(jax.random.categorical)(row_keys(sampling, step), scaled)
    return jnp.where(t > 0, sampled, jnp.argmax(logits, axis=-1)).astype(jnp.int32)
