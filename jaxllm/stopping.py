"""Stop conditions, all checked on device inside the decode loop.

Legend: B batch, V vocab, NS stop strings, LS their longest length in bytes, T the longest
token in bytes, W = LS + T the per-row byte window.

A row ends at the first of: an EOS id, a stop string completed by the new token (even
across token boundaries), a repeated n-gram, the user's predicate, or max_new_tokens.
Stop strings are matched on bytes: each row keeps the last W bytes of its output, appends
the new token's bytes from the tokenizer's [V, T] table, and tests every stop string that
ends inside the new bytes. The host later cuts the text at the stop string.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.errors import GenerationError

# index = code; 0 = running. "constraint": the row's constraint left no token it could emit.
FINISH_REASONS = ("", "eos", "stop", "repetition", "custom", "length", "constraint")
RUNNING, EOS, STOP, REPETITION, CUSTOM, LENGTH, CONSTRAINT = range(7)
MAX_REPEAT_NGRAM = 8  # repetition stop looks for n-grams with n <= 8
REPEAT_WINDOW = 256  # ... among the last 256 generated tokens


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["eos_ids", "max_new_tokens", "repeat_count", "stop_bytes", "stop_mask", "token_bytes", "token_len"],
    meta_fields=[],
)
@dataclasses.dataclass(frozen=True)
class StopParams:
    eos_ids: jax.Array  # [NE] i32, any of them ends a row (NE may be 0); or [B, NE], each row's own (>= V: padding)
    max_new_tokens: jax.Array  # [B] i32
    repeat_count: jax.Array  # [B] i32: end when the last tokens repeat one n-gram this many times (0 = off)
    stop_bytes: jax.Array  # [NS, LS] u8 stop strings, right-aligned (NS may be 0); or [B, NS, LS], each row's own
    stop_mask: jax.Array  # [NS, LS] bool which bytes of stop_bytes are real; or [B, NS, LS]
    token_bytes: jax.Array  # [V, T] u8 each token's bytes (see Tokenizer.token_bytes); [1, 1] without stops
    token_len: jax.Array  # [V] i32

    @property
    def window(self) -> int:
        return self.stop_bytes.shape[-1] + self.token_bytes.shape[1] if self.has_stop_strings else 1

    @property
    def has_stop_strings(self) -> bool:
        return self.stop_bytes.shape[-2] > 0

    @classmethod
    def make(
        cls,
        batch: int,
        max_new_tokens: int | Sequence[int],
        eos_ids: Sequence[int] = (),
        stop: Sequence[str] = (),
        token_bytes: tuple[np.ndarray, np.ndarray] | None = None,
        repeat_count: int | Sequence[int] = 0,
    ) -> "StopParams":
        max_new = np.broadcast_to(np.asarray(max_new_tokens, np.int32), (batch,))
        if np.any(max_new < 1):
            raise GenerationError(f"max_new_tokens must be >= 1, got {max_new.tolist()}")
        repeat = np.broadcast_to(np.asarray(repeat_count, np.int32), (batch,))
        if np.any((repeat != 0) & (repeat < 2)):
            raise GenerationError(f"repeat_count must be 0 (off) or >= 2, got {repeat.tolist()}")
        encoded = [s.encode("utf-8") for s in stop]
        if any(not s for s in encoded):
            raise GenerationError("stop strings must not be empty")
        if encoded and token_bytes is None:
            raise GenerationError("stop strings need a tokenizer (its token bytes)")
        ns = 1 << max(0, len(encoded) - 1).bit_length() if encoded else 0
        ls = 1 << max(0, max(map(len, encoded), default=1) - 1).bit_length()
        stop_bytes, stop_mask = np.zeros((ns, ls), np.uint8), np.zeros((ns, ls), bool)
        for i, s in enumerate(encoded):
            stop_bytes[i, ls - len(s) :] = np.frombuffer(s, np.uint8)
            stop_mask[i, ls - len(s) :] = True
        table, lengths = token_bytes if encoded else (np.zeros((1, 1), np.uint8), np.zeros((1,), np.int32))
        return cls(
            eos_ids=jnp.asarray(np.asarray(list(eos_ids), np.int32).reshape(-1)),
            max_new_tokens=jnp.asarray(max_new),
            repeat_count=jnp.asarray(repeat),
            stop_bytes=jnp.asarray(stop_bytes),
            stop_mask=jnp.asarray(stop_mask),
            token_bytes=jnp.asarray(table),
            token_len=jnp.asarray(lengths, jnp.int32),
        )


def append_bytes(window: jax.Array, token: jax.Array, stops: StopParams) -> jax.Array:
    """window: [B, W] right-aligned recent bytes -> the window with each row's token bytes appended."""
    W = window.shape[1]
    new = stops.token_bytes[token]  # [B, T], left-aligned, `token_len` of them real
    n = stops.token_len[token]
    joined = jnp.concatenate([window, new], axis=1)  # [B, W + T]
    return jax.vmap(lambda row, k: jax.lax.dynamic_slice(row, (k,), (W,)))(joined, n)


def stop_string_hit(window: jax.Array, filled: jax.Array, new_len: jax.Array, stops: StopParams) -> jax.Array:
    """Does a stop string end inside the newest `new_len` [B] bytes of `window` [B, W]? -> [B] bool

    `filled` [B] counts the real bytes in the window (the rest is left padding).
    """
    LS = stops.stop_bytes.shape[-1]
    T = stops.token_bytes.shape[1]
    W = window.shape[1]
    rows = lambda x: x if x.ndim == 3 else x[None]  # shared stop strings, or each row's own: [B or 1, NS, LS]
    stop_bytes, stop_mask = rows(stops.stop_bytes), rows(stops.stop_mask)
    lengths = jnp.sum(stop_mask, axis=-1)  # [B or 1, NS]
    hit = jnp.zeros(window.shape[:1], bool)
    for d in range(T):  # static: the match ends d bytes before the end of the window
        end = W - d
        seg = window[:, end - LS : end]  # [B, LS]
        same = jnp.all((seg[:, None, :] == stop_bytes) | ~stop_mask, axis=-1)  # [B, NS]
        inside = (d < new_len)[:, None] & (d + lengths <= filled[:, None]) & (lengths > 0)
        hit = hit | jnp.any(same & inside, axis=-1)
    return hit


def repetition_hit(outputs: jax.Array, valid: jax.Array, repeat_count: jax.Array) -> jax.Array:
    """Do the last outputs repeat one n-gram (n <= 8) at least `repeat_count` times?

    outputs, valid: [B, R] the most recent generated tokens, oldest first. -> [B] bool
    """
    hit = jnp.zeros(outputs.shape[:1], bool)
    for n in range(1, MAX_REPEAT_NGRAM + 1):  # static
        periodic = (outputs[:, n:] == outputs[:, :-n]) & valid[:, n:] & valid[:, :-n]  # [B, R - n]
        run = jnp.sum(jnp.cumprod(periodic[:, ::-1], axis=1), axis=1)  # trailing periodic stretch
        hit = hit | ((run + n) // n >= repeat_count)
    return hit & (repeat_count > 0)


def check_stops(
    token: jax.Array,
    running: jax.Array,
    step: jax.Array,
    recent: tuple[jax.Array, jax.Array],
    window: jax.Array,
    filled: jax.Array,
    stops: StopParams,
    custom: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The finish code [B] each row takes after emitting `token` [B] at `step` (0 = go on).

    recent: the last generated tokens and their validity ([B, R] each, new token included);
    window/filled: the byte window before this token; custom: the user's predicate [B].
    Returns (code, new window, new filled).
    """
    code = jnp.where(step + 1 >= stops.max_new_tokens, LENGTH, RUNNING)
    code = jnp.where(custom, CUSTOM, code)
    code = jnp.where(repetition_hit(*recent, stops.repeat_count), REPETITION, code)
    if stops.has_stop_strings:
        new_len = stops.token_len[token]
        window = append_bytes(window, token, stops)
        filled = jnp.minimum(filled + new_len, window.shape[1])
        code = jnp.where(stop_string_hit(window, filled, new_len, stops), STOP, code)
    eos = jnp.isin(token, stops.eos_ids) if stops.eos_ids.ndim == 1 else jnp.any(token[:, None] == stops.eos_ids, axis=1)
    code = jnp.where(eos, EOS, code)
    return jnp.where(running, code, RUNNING), window, filled


def cut_at_stop(text: str, stop: Sequence[str], include: bool = False) -> str:
    """The text up to the first stop string (kept when `include`)."""
    ends = [(text.find(s) + len(s), -len(s), s) for s in stop if s and s in text]
    if not ends:
        return text
    end, _, s = min(ends)  # the stop string that completes first (the row stopped there)
    return text[:end] if include else text[: end - len(s)]


def holdback(text: str, stop: Sequence[str]) -> int:
    """How many trailing characters could still begin a stop string (streaming holds them back)."""
    keep = 0
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), keep, -1):
            if text.endswith(s[:k]):
                keep = k
                break
    return keep
