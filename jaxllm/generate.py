"""Generation: prefill once, then a jit-compiled `lax.scan` decode loop over a preallocated cache.

Legend: B batch, P padded prompt length, N output buffer length, V vocab.

    prompts ──left-pad to a bucket──▶ prefill (one forward) ──▶ logits of the next token
    repeat in chunks of `chunk` steps until every row is done:
        choose_next(logits) ──▶ record token, update stop flags ──▶ forward(token) ──▶ logits

Prompts are left-padded so every row writes the cache at one cursor; prompt and output
lengths are rounded up to buckets so a new length rarely compiles a new program. Sampling
values and `max_new_tokens` are traced, so changing them never recompiles.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import ModelConfig
from jaxllm.errors import GenerationError
from jaxllm.kvcache import KVCache, init_cache
from jaxllm.model import forward, hidden_states, unembed
from jaxllm.sampling import SamplingParams, choose_next
from jaxllm.tokenizer import Tokenizer

FINISH_REASONS = ("", "eos", "length")  # index = finish code; 0 = still running
RUNNING, EOS, LENGTH = 0, 1, 2
MIN_PROMPT_BUCKET = 16


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["logits", "tokens", "length", "finish", "next_pos", "step", "cache"],
    meta_fields=[],
)
@dataclasses.dataclass(frozen=True)
class DecodeState:
    logits: jax.Array  # [B, V] float32 logits for the next token
    tokens: jax.Array  # [B, N] int32 generated ids; pad after a row finishes
    length: jax.Array  # [B] int32 tokens generated per row (EOS included)
    finish: jax.Array  # [B] int32 finish code (FINISH_REASONS); 0 = running
    next_pos: jax.Array  # [B] int32 position of the next token fed to the model
    step: jax.Array  # [] int32 decode steps taken
    cache: KVCache


# ---------------------------------------------------------------------------- buckets and padding


def bucket(n: int, minimum: int = MIN_PROMPT_BUCKET) -> int:
    """The next power of two >= n (and >= minimum): few shapes, so few compilations."""
    return max(minimum, 1 << max(0, n - 1).bit_length())


def left_pad(prompts: Sequence[Sequence[int]], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-aligns prompts in a [B, length] block -> (tokens, positions); padding has position -1."""
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    positions = np.full((len(prompts), length), -1, np.int32)
    for row, ids in enumerate(prompts):
        n = len(ids)
        if n:
            tokens[row, length - n :] = ids
            positions[row, length - n :] = np.arange(n)
    return tokens, positions


# ---------------------------------------------------------------------------- the loop (pure)


def init_state(
    params, cfg: ModelConfig, prompt: jax.Array, prompt_pos: jax.Array, buffer_len: int, pad_id: int = 0
) -> DecodeState:
    """Prefill: one forward over the left-padded prompt block [B, P] into a fresh cache of P + N slots."""
    B, P = prompt.shape
    cache = init_cache(cfg, B, P + buffer_len)
    h, cache = hidden_states(params, cfg, prompt, prompt_pos, cache)
    return DecodeState(
        logits=unembed(params, cfg, h[:, -1]),  # left padding: every row's last token is in column P-1
        tokens=jnp.full((B, buffer_len), pad_id, jnp.int32),
        length=jnp.zeros((B,), jnp.int32),
        finish=jnp.zeros((B,), jnp.int32),
        next_pos=jnp.max(prompt_pos, axis=1) + 1,
        step=jnp.zeros((), jnp.int32),
        cache=cache,
    )


def decode_step(
    params, cfg: ModelConfig, state: DecodeState, sampling: SamplingParams, eos_ids: jax.Array, max_new_tokens, pad_id: int = 0
) -> DecodeState:
    """One token for every row: choose -> record -> update stops -> forward. Finished rows emit padding."""
    running = state.finish == RUNNING
    token = jnp.where(running, choose_next(state.logits, sampling, state.step), pad_id)
    finish = jnp.where(running & jnp.isin(token, eos_ids), EOS, state.finish)
    finish = jnp.where((finish == RUNNING) & (state.step + 1 >= max_new_tokens), LENGTH, finish)
    logits, cache = forward(params, cfg, token[:, None], state.next_pos[:, None], state.cache)
    return DecodeState(
        logits=logits[:, 0],
        tokens=jax.lax.dynamic_update_slice(state.tokens, token[:, None], (0, state.step)),
        length=state.length + running,
        finish=finish,
        next_pos=state.next_pos + 1,
        step=state.step + 1,
        cache=cache,
    )


def all_done(state: DecodeState) -> jax.Array:
    return jnp.all(state.finish != RUNNING)


def decode_chunk(
    params, cfg: ModelConfig, state: DecodeState, sampling, eos_ids, max_new_tokens, chunk: int, pad_id: int = 0
) -> DecodeState:
    """`chunk` decode steps as one `lax.scan`; steps after every row is done cost nothing."""

    def step(state, _):
        state = jax.lax.cond(
            all_done(state),
            lambda s: s,
            lambda s: decode_step(params, cfg, s, sampling, eos_ids, max_new_tokens, pad_id),
            state,
        )
        return state, None

    return jax.lax.scan(step, state, None, length=chunk)[0]


def generate_tokens(
    params,
    cfg: ModelConfig,
    prompt: jax.Array,
    prompt_pos: jax.Array,
    sampling: SamplingParams,
    eos_ids: jax.Array,
    max_new_tokens,
    *,
    buffer_len: int,
    chunk: int = 16,
    pad_id: int = 0,
) -> DecodeState:
    """The whole generation as one pure function (usable inside a user's `jit`).

    prompt, prompt_pos: [B, P] from `left_pad`; eos_ids: [n] int32 (n may be 0);
    max_new_tokens: traced scalar <= buffer_len; buffer_len: static, a multiple of chunk.
    Returns the final state: `tokens [B, N]`, `length [B]`, `finish [B]`.
    """
    state = init_state(params, cfg, prompt, prompt_pos, buffer_len, pad_id)
    return jax.lax.while_loop(
        lambda s: ~all_done(s),
        lambda s: decode_chunk(params, cfg, s, sampling, eos_ids, max_new_tokens, chunk, pad_id),
        state,
    )


_init_jit = jax.jit(init_state, static_argnames=("cfg", "buffer_len", "pad_id"))
# The state (cache included) is donated: each chunk updates the cache in place.
_chunk_jit = jax.jit(decode_chunk, static_argnames=("cfg", "chunk", "pad_id"), donate_argnames=("state",))


# ---------------------------------------------------------------------------- host driver


@dataclasses.dataclass
class GenerationResult:
    token_ids: list[list[int]]  # generated ids per row (EOS kept, padding dropped)
    finish_reasons: list[str]  # "eos" or "length"
    num_prompt_tokens: list[int]
    texts: list[str] | None = None  # decoded output when a tokenizer was given
    timing: dict = dataclasses.field(default_factory=dict)  # prefill_s, decode_s (device work, blocked)


def generate(
    params,
    cfg: ModelConfig,
    prompts: Sequence[str] | Sequence[Sequence[int]] | str,
    *,
    tokenizer: Tokenizer | None = None,
    max_new_tokens: int = 64,
    temperature: float | Sequence[float] = 1.0,
    seed: int | Sequence[int] | None = None,
    sampling: SamplingParams | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    add_bos: bool = True,
    chunk: int = 16,
) -> GenerationResult:
    """Generates continuations for a batch of prompts (strings need `tokenizer`; or lists of ids).

    EOS defaults to the tokenizer's; pass `eos_token_id=[]` to never stop early.
    Raises `GenerationError` for input that cannot work (empty prompt, too long for the context).
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts:
        raise GenerationError("no prompts given")
    if isinstance(prompts[0], str):
        if tokenizer is None:
            raise GenerationError("text prompts need a tokenizer (or pass token ids)")
        prompts = [tokenizer.encode(p, add_bos=add_bos) for p in prompts]
    prompts = [list(map(int, p)) for p in prompts]
    if max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    for i, p in enumerate(prompts):
        if not p:
            raise GenerationError(f"prompt {i} is empty (no tokens to condition on)")
        if len(p) + max_new_tokens > cfg.max_seq_len:
            raise GenerationError(
                f"prompt {i} has {len(p)} tokens; with max_new_tokens={max_new_tokens} it needs "
                f"{len(p) + max_new_tokens} positions, more than the model's context of {cfg.max_seq_len}"
            )
        if min(p) < 0 or max(p) >= cfg.vocab_size:
            raise GenerationError(f"prompt {i} has token ids outside the vocabulary (size {cfg.vocab_size})")

    if eos_token_id is None:
        eos_token_id = [tokenizer.eos_id] if tokenizer is not None and tokenizer.eos_id is not None else []
    eos_ids = jnp.asarray(np.atleast_1d(np.asarray(eos_token_id, np.int32)).reshape(-1), jnp.int32)
    pad_id = tokenizer.pad_id if tokenizer is not None and tokenizer.pad_id is not None else 0
    B = len(prompts)
    sampling = sampling if sampling is not None else SamplingParams.make(B, temperature, seed)
    buffer_len = bucket(max_new_tokens, minimum=chunk)
    tokens, positions = left_pad(prompts, bucket(max(map(len, prompts))), pad_id)

    t0 = time.perf_counter()
    state = _init_jit(params, cfg, jnp.asarray(tokens), jnp.asarray(positions), buffer_len, pad_id)
    state.logits.block_until_ready()
    t1 = time.perf_counter()
    limit = jnp.asarray(max_new_tokens, jnp.int32)
    while True:  # one host check per chunk: stop as soon as every row is done
        state = _chunk_jit(params, cfg, state, sampling, eos_ids, limit, chunk, pad_id)
        if bool(all_done(state)):
            break
    t2 = time.perf_counter()

    out, lengths, finish = jax.device_get((state.tokens, state.length, state.finish))
    token_ids = [out[r, : lengths[r]].tolist() for r in range(B)]
    return GenerationResult(
        token_ids=token_ids,
        finish_reasons=[FINISH_REASONS[f] for f in finish],
        num_prompt_tokens=[len(p) for p in prompts],
        texts=tokenizer.decode_batch(token_ids) if tokenizer is not None else None,
        timing={"prefill_s": t1 - t0, "decode_s": t2 - t1},
    )
