"""Generation: a prefill program, then a decode program run chunk by chunk over a preallocated cache.

Legend: B batch, P padded prompt length, N output buffer length, V vocab, A logprob alternatives.

    prompts ──left-pad to a bucket──▶ init_state: prefill (one forward, or `prefill_chunk`
        columns at a time) ──▶ DecodeState holding the logits of the next token
    decode_chunk: a `lax.while_loop` of up to `chunk` decode_steps that also ends once every
        row is done; a decode_step is
        (constraint mask) ──▶ choose_next(logits) ──▶ emit: record token, check stops ──▶ forward(token)
    host (generate, generate_stream): the chunk program again, its state donated, with one device-to-host check of
        the finish codes per chunk, until every row is done (streaming reads the state there)

`generate_tokens` is the same loop with no host in it: a `lax.while_loop` over chunks.
Prompts are left-padded so every row writes the cache at one cursor; prompt and output
lengths are rounded up to buckets so a new length rarely compiles a new program. Sampling
values, stop strings' bytes and `max_new_tokens` are traced, so changing them compiles
nothing new unless a rounded-up size changes (README, "When a program is compiled").
The semantics of every control are in docs/GENERATION.md. `generate` and `generate_stream`
hand a request for speculative decoding (`prompt_lookup_max`, or a `draft`) to speculative.py.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import devices, kvcache
from jaxllm.compilation import Compiled
from jaxllm.config import ModelConfig
from jaxllm.kvcache import CacheSpec, KVCache, init_cache
from jaxllm.model import forward, prefill, prefill_length, unembed
from jaxllm.request import SAMPLE, SPECULATIVE, Prepared, Request, RequestError, prepare
from jaxllm.request import make as make_request
from jaxllm.results import GenerationResult, TextStream, collect, retry_invalid
from jaxllm.sampling import (
    NEG_INF, History, SamplingParams, choose_next, init_history, last_tokens, pow2_bucket, put_column, record,
)
from jaxllm.stopping import CONSTRAINT, REPEAT_WINDOW, RUNNING, StopParams, check_stops
from jaxllm.structured import constraints
from jaxllm.tokenizer import Tokenizer

MIN_PROMPT_BUCKET = 16
StopFn = Callable[[History], jax.Array]  # the user's predicate: history -> bool [B]


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=[
        "logits", "history", "finish", "next_pos", "window", "filled", "logprobs", "top_ids", "top_logprobs", "cache",
        "constraint",
    ],
    meta_fields=[],
)
@dataclasses.dataclass(frozen=True)
class DecodeState:
    logits: jax.Array  # [B, V] f32 logits for the next token
    history: History  # prompt block + generated tokens [B, P + N], penalty counts, step
    finish: jax.Array  # [B] i32 finish code (stopping.FINISH_REASONS); 0 = running
    next_pos: jax.Array  # [B] i32 position of the next token fed to the model
    window: jax.Array  # [B, W] u8 last bytes of the output, for stop strings
    filled: jax.Array  # [B] i32 real bytes in `window`
    logprobs: jax.Array  # [B, N] f32 log-probability of each chosen token (after processing)
    top_ids: jax.Array  # [B, N, A] i32 most likely alternatives at each step
    top_logprobs: jax.Array  # [B, N, A] f32 their log-probabilities
    cache: KVCache
    constraint: constraints.RowState | None = None  # each row's automaton state, when constrained

    @property
    def step(self) -> jax.Array:
        return self.history.step

    @property
    def tokens(self) -> jax.Array:
        """[B, N] generated ids (pad where nothing was generated)."""
        return self.history.tokens[:, self.history.prompt_len :]

    @property
    def length(self) -> jax.Array:
        """[B] tokens generated per row (EOS included)."""
        return jnp.sum(self.history.valid[:, self.history.prompt_len :], axis=1)


# ---------------------------------------------------------------------------- buckets and padding


def bucket(n: int, minimum: int = MIN_PROMPT_BUCKET) -> int:
    """The next power of two >= n (and >= minimum): few shapes, so few compilations."""
    return max(minimum, pow2_bucket(n))


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
    params, cfg: ModelConfig, prompt: jax.Array, prompt_pos: jax.Array, stops: StopParams,
    *, buffer_len: int, num_alternatives: int = 0, spec: CacheSpec = CacheSpec(),
    constraint: constraints.RowState | None = None, lookahead: int = 0,
) -> DecodeState:
    """Prefill: the left-padded prompt block [B, P] into a fresh cache of P + N slots, or a ring
    (`spec`: window, sinks, KV dtype), `spec.prefill_chunk` columns at a time (model.prefill).

    The one start-up path of every decoder (sampling, beams, speculative): the cache, history
    and stop state are made here. `constraint`: the rows' initial automaton states (see
    `constraints.build`), if constrained. `lookahead`: columns a decoder may write past the last
    token it keeps and take back (speculative drafts): that many more cache slots (a ring keeps
    its window) and history columns.
    """
    B, P = prompt.shape
    slots, ring = spec.num_slots(cfg, prefill_length(P, spec.prefill_chunk) + buffer_len + lookahead)
    slots += lookahead if ring else 0
    cache = init_cache(cfg, B, slots, spec.dtype or None, ring=ring, sinks=spec.sinks, lookahead=lookahead)
    h, cache = prefill(params, cfg, prompt, prompt_pos, cache, spec.prefill_chunk)
    A = num_alternatives
    return DecodeState(
        logits=unembed(params, cfg, h),  # left padding: every row's last token is in column P-1
        history=init_history(prompt, prompt_pos >= 0, buffer_len + lookahead, cfg.vocab_size),
        finish=jnp.zeros((B,), jnp.int32),
        next_pos=jnp.max(prompt_pos, axis=1) + 1,
        window=jnp.zeros((B, stops.window), jnp.uint8),
        filled=jnp.zeros((B,), jnp.int32),
        logprobs=jnp.zeros((B, buffer_len), jnp.float32),
        top_ids=jnp.zeros((B, buffer_len, A), jnp.int32),
        top_logprobs=jnp.zeros((B, buffer_len, A), jnp.float32),
        cache=cache,
        constraint=constraint,
    )


def take_rows(state: DecodeState, rows: jax.Array) -> DecodeState:
    """The state whose row r is a copy of row `rows[r]` (rows: [R] int): every per-row array
    follows, the cache included (`kvcache.take_rows`); beams use it to repeat and reorder rows."""
    history = state.history
    per_row = lambda tree: jax.tree_util.tree_map(lambda x: x[rows], tree)
    return dataclasses.replace(
        per_row(dataclasses.replace(state, cache=None, history=None)),
        history=dataclasses.replace(per_row(dataclasses.replace(history, step=None)),
                                    step=history.step[rows] if history.step.ndim else history.step),
        cache=kvcache.take_rows(state.cache, rows),
    )


def emit(
    state: DecodeState, token: jax.Array, logprobs: jax.Array, stops: StopParams,
    *, pad_id: int = 0, stop_fn: StopFn | None = None, active: jax.Array | None = None,
) -> DecodeState:
    """Appends one chosen token per row [B] (drawn from `logprobs` [B, V]): record it, check stops,
    keep its log-probability. Finished rows record padding. The model is not run.

    `active` [B] (with per-row steps, `sampling.per_row`): only these rows emit; the others are
    left as they are."""
    running = state.finish == RUNNING
    if active is not None:
        running = running & active
    step = state.step
    token = jnp.where(running, token, pad_id)
    history = record(state.history, token, running)
    custom = stop_fn(history) if stop_fn is not None else jnp.zeros_like(running)
    code, window, filled = check_stops(
        token, running, step, last_tokens(history, REPEAT_WINDOW, outputs_only=True),
        state.window, state.filled, stops, custom,
    )
    chosen = jnp.take_along_axis(logprobs, token[:, None], axis=1)  # [B, 1]
    A = state.top_ids.shape[2]
    top_lp, top_ids = jax.lax.top_k(logprobs, A) if A else (state.top_logprobs[:, 0], state.top_ids[:, 0])
    # A row that does not emit here (`active`) writes padding, a log-probability and alternatives
    # into its next column anyway: that column is written again when the row does emit.
    if active is not None:  # rows that do not emit keep their byte windows
        window = jnp.where(running[:, None], window, state.window)
        filled = jnp.where(running, filled, state.filled)
    return dataclasses.replace(
        state,
        history=history,
        finish=jnp.where(running, code, state.finish),
        window=window,
        filled=filled,
        logprobs=put_column(state.logprobs, step, chosen[:, 0]),
        top_ids=put_column(state.top_ids, step, top_ids),
        top_logprobs=put_column(state.top_logprobs, step, top_lp),
    )


def decode_step(
    params, cfg: ModelConfig, state: DecodeState, sp: SamplingParams, stops: StopParams,
    automaton: constraints.Automaton | None = None, *, pad_id: int = 0, stop_fn: StopFn | None = None,
) -> DecodeState:
    """One token for every row: (constraint mask) -> choose -> record and check stops (`emit`) -> forward.

    With an `automaton`, tokens the row's constraint forbids are -inf before anything else
    in the chain; a row left with no token it may emit ends with finish reason "constraint".
    """
    logits = state.logits
    if automaton is not None:
        budget = stops.max_new_tokens - state.step - 1  # tokens left after this one
        ok, outcome = constraints.mask(automaton, state.constraint, stops.eos_ids, budget)
        logits = jnp.where(ok, logits, NEG_INF)
    token, logprobs = choose_next(logits, sp, state.history, stops.eos_ids)
    if automaton is not None:
        stuck = (state.finish == RUNNING) & ~jnp.any(jnp.isfinite(logprobs), axis=-1)
        state = dataclasses.replace(state, finish=jnp.where(stuck, CONSTRAINT, state.finish))
    running = state.finish == RUNNING
    fed = jnp.where(running, token, pad_id)  # what emit records
    previous = state.constraint
    state = emit(state, token, logprobs, stops, pad_id=pad_id, stop_fn=stop_fn)
    if automaton is not None:
        state = dataclasses.replace(state, constraint=constraints.advance(automaton, previous, outcome, token, running))
    logits, cache = forward(params, cfg, fed[:, None], state.next_pos[:, None], state.cache)
    return dataclasses.replace(state, logits=logits[:, 0], next_pos=state.next_pos + 1, cache=cache)


def all_done(state: DecodeState) -> jax.Array:
    return jnp.all(state.finish != RUNNING)


def decode_chunk(
    params, cfg: ModelConfig, state: DecodeState, sp: SamplingParams, stops: StopParams,
    automaton: constraints.Automaton | None = None, *, chunk: int, pad_id: int = 0, stop_fn: StopFn | None = None,
) -> DecodeState:
    """Up to `chunk` decode steps, fewer if every row finishes first.

    A `lax.while_loop` rather than a scan with a `lax.cond` skip: the loop updates the cache
    in place, where a cond made XLA copy the whole cache into and out of its branches.
    """
    end = state.step + chunk
    return jax.lax.while_loop(
        lambda s: (s.step < end) & ~all_done(s),
        lambda s: decode_step(params, cfg, s, sp, stops, automaton, pad_id=pad_id, stop_fn=stop_fn),
        state,
    )


def generate_tokens(
    params, cfg: ModelConfig, prompt: jax.Array, prompt_pos: jax.Array, sp: SamplingParams, stops: StopParams,
    automaton: constraints.Automaton | None = None, constraint: constraints.RowState | None = None,
    *, buffer_len: int, chunk: int = 16, pad_id: int = 0, num_alternatives: int = 0, stop_fn: StopFn | None = None,
    spec: CacheSpec = CacheSpec(),
) -> DecodeState:
    """The whole generation as one pure function (usable inside a user's `jit`).

    prompt, prompt_pos: [B, P] from `left_pad`; buffer_len: static, >= max_new_tokens.
    automaton, constraint: from `constraints.build`, to constrain the output.
    Returns the final state: `.tokens [B, N]`, `.length [B]`, `.finish [B]`, `.logprobs [B, N]`.
    """
    state = init_state(
        params, cfg, prompt, prompt_pos, stops, buffer_len=buffer_len, num_alternatives=num_alternatives, spec=spec,
        constraint=constraint,
    )
    return jax.lax.while_loop(
        lambda s: ~all_done(s),
        lambda s: decode_chunk(params, cfg, s, sp, stops, automaton, chunk=chunk, pad_id=pad_id, stop_fn=stop_fn),
        state,
    )


_init_program = Compiled(init_state)
# The state (cache included) is donated: each chunk updates the cache in place.
_chunk_program = Compiled(decode_chunk, donate_argnames=("state",))


# ---------------------------------------------------------------------------- host driver


def _run(params, cfg, prep: Prepared, timing: dict) -> Iterator[DecodeState]:
    """Prefill, then one jitted chunk at a time until every row is done; yields after each chunk."""
    r = prep.request
    params = devices.prepare(params, cfg)  # once per params object (cached), not once per call
    tokens, positions = left_pad(prep.prompts, bucket(max(map(len, prep.prompts))), prep.pad_id)
    init = dict(cfg=cfg, buffer_len=prep.buffer_len, num_alternatives=r.logprobs or 0, spec=prep.spec)
    inputs = dict(params=params, prompt=jax.device_put(tokens), prompt_pos=jax.device_put(positions), stops=prep.stops,
                  constraint=prep.row_states)
    step = dict(cfg=cfg, chunk=r.chunk, pad_id=prep.pad_id, stop_fn=r.stop_fn)
    t0 = time.perf_counter()
    # The chunk program compiles in the background, from the prefill's output shapes, while the
    # prefill program compiles and runs: XLA compiles each on one thread (a cold start saves the
    # shorter compile). Both are no-ops for programs compiled before.
    shapes, lower_s = _init_program.out_info(init, **inputs)
    lower_s += _chunk_program.compile_ahead(
        step, params=params, state=shapes, sp=prep.sampling, stops=prep.stops, automaton=prep.automaton
    )
    state, compile_s = _init_program(init, **inputs)
    state.logits.block_until_ready()
    timing["compile_s"] = lower_s + compile_s
    timing["prefill_s"] = time.perf_counter() - t0 - timing["compile_s"]
    decode_s = 0.0
    while True:  # one host check per chunk: stop as soon as every row is done
        t = time.perf_counter()
        state, compile_s = _chunk_program(
            step, params=params, state=state, sp=prep.sampling, stops=prep.stops, automaton=prep.automaton
        )
        done = bool(np.all(jax.device_get(state.finish) != RUNNING))  # blocks until the chunk is computed
        timing["compile_s"] += compile_s
        decode_s += time.perf_counter() - t - compile_s
        timing["decode_s"] = decode_s
        yield state
        if done:
            return


def _draft(req: Request) -> tuple:
    """(draft params, draft config) of a speculative request; (None, None) with prompt lookup."""
    return (None, None) if req.draft is None else (req.draft.params, req.draft.cfg)


def generate(params, cfg: ModelConfig, request: Request | object, *, tokenizer: Tokenizer | None = None,
             **options) -> GenerationResult:
    """Generates continuations: `request` is a `Request`, or its prompts with the other fields as
    keyword `options` (`generate(params, cfg, ["a", "b"], tokenizer=tok, temperature=0.7)`).

    Text prompts, chat, stop strings and bad words need `tokenizer`; token-id prompts do not.
    Every option is a field of `request.Request` (documented there, with its default and
    range); per-prompt options take one value or a list with one value per prompt. A request for
    speculative decoding (`prompt_lookup_max`, or a `draft`) runs `speculative.speculative_generate`;
    beam search (`num_beams`) is refused: see `beam.beam_generate`. With `retries=R`, rows whose output breaks their
    constraint are sampled again (new seeds) up to R times.
    Raises `GenerationError` for input that cannot work (empty prompt, too long for the context, an
    option out of range or out of place: `request.RequestError` names the fields).
    """
    req = make_request(request, options)
    if req.stream:
        raise RequestError("{stream} needs generate_stream (generate returns only the finished result)")
    if req.mode == SPECULATIVE:
        from jaxllm.speculative import speculative_generate

        return speculative_generate(params, cfg, *_draft(req), req, tokenizer=tokenizer)
    prep, timing = prepare(req, cfg, tokenizer, SAMPLE), {}
    *_, state = _run(params, cfg, prep, timing)
    result = collect(state, prep, tokenizer, timing)
    for attempt in range(1, req.retries + 1):  # verify-and-retry: sample the invalid rows again, with new seeds
        result = retry_invalid(lambda again: generate(params, cfg, again, tokenizer=tokenizer), req, result, attempt)
    return result


def generate_stream(params, cfg: ModelConfig, request: Request | object, *, tokenizer: Tokenizer,
                    **options) -> Iterator[tuple[int, object]]:
    """Like `generate` (same arguments), but yields `(row, text)` pieces as each chunk of steps finishes.

    Pieces never split a UTF-8 character nor reveal the start of a stop string; each row's
    pieces concatenate to that row's `generate(...).texts[row]`. The last item yielded is
    `(-1, result)` with the complete `GenerationResult`.
    """
    req = make_request(request, options)
    if req.mode == SPECULATIVE:
        from jaxllm.speculative import speculative_generate_stream

        yield from speculative_generate_stream(params, cfg, *_draft(req), req, tokenizer=tokenizer)
        return
    prep, timing = prepare(req, cfg, tokenizer, SAMPLE), {}
    text = TextStream(tokenizer, prep.prompts, prep.stop_strings, req.include_stop_str_in_output)
    for state in _run(params, cfg, prep, timing):
        yield from text.pieces(state)
    yield -1, collect(state, prep, tokenizer, timing)
