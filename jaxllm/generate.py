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
The semantics of every control are in docs/GENERATION.md.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import time
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import devices, kvcache
from jaxllm.compilation import Compiled
from jaxllm.config import ModelConfig
from jaxllm.errors import GenerationError
from jaxllm.kvcache import CacheSpec, KVCache, init_cache
from jaxllm.model import forward, prefill, prefill_length, unembed
from jaxllm.results import GenerationResult, TextStream, collect, retry_invalid
from jaxllm.sampling import (
    NEG_INF, History, SamplingParams, choose_next, init_history, last_tokens, pow2_bucket, record,
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
        history=dataclasses.replace(per_row(dataclasses.replace(history, step=None)), step=history.step),
        cache=kvcache.take_rows(state.cache, rows),
    )


def emit(
    state: DecodeState, token: jax.Array, logprobs: jax.Array, stops: StopParams,
    *, pad_id: int = 0, stop_fn: StopFn | None = None,
) -> DecodeState:
    """Appends one chosen token per row [B] (drawn from `logprobs` [B, V]): record it, check stops,
    keep its log-probability. Finished rows record padding. The model is not run."""
    running = state.finish == RUNNING
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
    return dataclasses.replace(
        state,
        history=history,
        finish=jnp.where(running, code, state.finish),
        window=window,
        filled=filled,
        logprobs=jax.lax.dynamic_update_slice(state.logprobs, chosen, (0, step)),
        top_ids=jax.lax.dynamic_update_slice(state.top_ids, top_ids[:, None], (0, step, 0)),
        top_logprobs=jax.lax.dynamic_update_slice(state.top_logprobs, top_lp[:, None], (0, step, 0)),
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


@dataclasses.dataclass
class _Request:
    prompts: list[list[int]]  # one per output row (prompts repeated n times)
    prompt_index: list[int]
    sampling: SamplingParams
    stops: StopParams
    stop_strings: list[str]
    buffer_len: int
    pad_id: int
    constraints: list  # per row: a Constraint or None
    automaton: constraints.Automaton | None = None  # None: no row is constrained (or enforce=False)
    row_states: constraints.RowState | None = None


def _prepare(
    cfg: ModelConfig, prompts, tokenizer, *, max_new_tokens, n, stop, eos_token_id, repeat_count, add_bos,
    parse_special, sampling, sampling_kwargs, chunk, spec: CacheSpec | None = None, constraint=None, enforce=True,
) -> _Request:
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], (int, np.integer))):
        prompts = [prompts]
    if not prompts:
        raise GenerationError("no prompts given")
    if isinstance(prompts[0], str):
        if tokenizer is None:
            raise GenerationError("text prompts need a tokenizer (or pass token ids)")
        prompts = [tokenizer.encode(p, add_bos=add_bos, parse_special=parse_special) for p in prompts]
    prompts = [list(map(int, p)) for p in prompts]
    if not isinstance(n, int) or n < 1:
        raise GenerationError(f"num_return_sequences must be >= 1, got {n}")
    if not isinstance(max_new_tokens, (int, np.integer)) or not 1 <= max_new_tokens < 2**31:  # positions are int32
        raise GenerationError(f"max_new_tokens must be >= 1 and < 2**31, got {max_new_tokens}")
    for i, p in enumerate(prompts):
        if not p:
            raise GenerationError(f"prompt {i} is empty (no tokens to condition on)")
        if len(p) + max_new_tokens > cfg.max_seq_len and not (spec and spec.ring_size(cfg)):  # a ring never fills
            raise GenerationError(
                f"prompt {i} has {len(p)} tokens; with max_new_tokens={max_new_tokens} it needs "
                f"{len(p) + max_new_tokens} positions, more than the model's context of {cfg.max_seq_len}"
            )
        if min(p) < 0 or max(p) >= cfg.vocab_size:
            raise GenerationError(f"prompt {i} has token ids outside the vocabulary (size {cfg.vocab_size})")

    rows = [p for p in prompts for _ in range(n)]
    index = [i for i in range(len(prompts)) for _ in range(n)]
    B = len(rows)
    if sampling is None:
        per_prompt = {k: v for k, v in sampling_kwargs.items() if isinstance(v, (list, tuple)) and k != "bad_words_ids" and k != "allowed_token_ids"}
        for k, v in per_prompt.items():  # per-prompt lists expand to per-row lists
            if len(v) != len(prompts):
                raise GenerationError(f"{k} has {len(v)} values for {len(prompts)} prompts")
            sampling_kwargs[k] = [v[i] for i in index]
        sampling = SamplingParams.make(B, cfg.vocab_size, sample_index=[r % n for r in range(B)], **sampling_kwargs)
    elif sampling.batch != B:
        raise GenerationError(f"sampling has {sampling.batch} rows, but there are {B} outputs")

    if eos_token_id is None:
        eos_token_id = [tokenizer.eos_id] if tokenizer is not None and tokenizer.eos_id is not None else []
    eos = [int(e) for e in np.atleast_1d(np.asarray(eos_token_id, object))]  # Python ints: a huge id is refused, not overflowed
    if any(not 0 <= e < cfg.vocab_size for e in eos):
        raise GenerationError(f"eos_token_id {eos} is outside the vocabulary (size {cfg.vocab_size})")
    stop = list(stop or [])
    stops = StopParams.make(
        B, max_new_tokens, eos, stop, tokenizer.token_bytes() if (stop and tokenizer is not None) else None, repeat_count
    )
    pad_id = tokenizer.pad_id if tokenizer is not None and tokenizer.pad_id is not None else 0
    per_prompt = list(constraint) if isinstance(constraint, (list, tuple)) else [constraint] * len(prompts)
    if len(per_prompt) != len(prompts):
        raise GenerationError(f"constraint has {len(per_prompt)} entries for {len(prompts)} prompts")
    rows_constraint = [per_prompt[i] for i in index]
    req = _Request(rows, index, sampling, stops, stop, bucket(max_new_tokens, minimum=chunk), pad_id, rows_constraint)
    if enforce and any(c is not None for c in rows_constraint):
        req.automaton, req.row_states = constraints.build(rows_constraint, tokenizer, cfg.vocab_size)
    return req


def _run(params, cfg, req: _Request, *, chunk, num_alternatives, stop_fn, timing, spec) -> Iterator[DecodeState]:
    """Prefill, then one jitted chunk at a time until every row is done; yields after each chunk."""
    params = devices.prepare(params, cfg)  # once per params object (cached), not once per call
    tokens, positions = left_pad(req.prompts, bucket(max(map(len, req.prompts))), req.pad_id)
    init = dict(cfg=cfg, buffer_len=req.buffer_len, num_alternatives=num_alternatives, spec=spec)
    inputs = dict(params=params, prompt=jax.device_put(tokens), prompt_pos=jax.device_put(positions), stops=req.stops,
                  constraint=req.row_states)
    step = dict(cfg=cfg, chunk=chunk, pad_id=req.pad_id, stop_fn=stop_fn)
    t0 = time.perf_counter()
    # The chunk program compiles in the background, from the prefill's output shapes, while the
    # prefill program compiles and runs: XLA compiles each on one thread (a cold start saves the
    # shorter compile). Both are no-ops for programs compiled before.
    shapes, lower_s = _init_program.out_info(init, **inputs)
    lower_s += _chunk_program.compile_ahead(
        step, params=params, state=shapes, sp=req.sampling, stops=req.stops, automaton=req.automaton
    )
    state, compile_s = _init_program(init, **inputs)
    state.logits.block_until_ready()
    timing["compile_s"] = lower_s + compile_s
    timing["prefill_s"] = time.perf_counter() - t0 - timing["compile_s"]
    decode_s = 0.0
    while True:  # one host check per chunk: stop as soon as every row is done
        t = time.perf_counter()
        state, compile_s = _chunk_program(
            step, params=params, state=state, sp=req.sampling, stops=req.stops, automaton=req.automaton
        )
        done = bool(np.all(jax.device_get(state.finish) != RUNNING))  # blocks until the chunk is computed
        timing["compile_s"] += compile_s
        decode_s += time.perf_counter() - t - compile_s
        timing["decode_s"] = decode_s
        yield state
        if done:
            return


_SAMPLING_KEYS = (
    "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty",
    "no_repeat_ngram_size", "min_new_tokens", "logit_bias", "allowed_token_ids", "bad_words_ids", "seed",
)


def _split_kwargs(tokenizer, kwargs) -> dict:
    unknown = sorted(set(kwargs) - set(_SAMPLING_KEYS) - {"bad_words"})
    if unknown:
        raise TypeError(f"generate() got unexpected keyword argument(s): {', '.join(unknown)}")
    words = kwargs.pop("bad_words", None)
    if words:  # strings -> token sequences (as the tokenizer splits them, with and without a leading space)
        if tokenizer is None:
            raise GenerationError("bad_words strings need a tokenizer (or pass bad_words_ids)")
        seqs = {tuple(tokenizer.encode(v)) for w in words for v in (w, " " + w)}
        kwargs["bad_words_ids"] = list(kwargs.get("bad_words_ids", ())) + [list(s) for s in seqs if s]
    return kwargs


def generate(
    params,
    cfg: ModelConfig,
    prompts: str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]],
    *,
    tokenizer: Tokenizer | None = None,
    max_new_tokens: int = 64,
    num_return_sequences: int = 1,
    stop: Sequence[str] = (),
    include_stop_str_in_output: bool = False,
    eos_token_id: int | Sequence[int] | None = None,
    repeat_count: int = 0,
    stop_fn: StopFn | None = None,
    logprobs: int | None = None,
    sampling: SamplingParams | None = None,
    add_bos: bool = True,
    parse_special: bool = False,
    chunk: int = 16,
    window: int = 0,
    sinks: int = 0,
    prefill_chunk: int = 512,
    kv_cache_dtype: str | None = None,
    constraint: "constraints.Constraint | Sequence[constraints.Constraint | None] | None" = None,
    enforce: bool = True,
    retries: int = 0,
    **sampling_kwargs,
) -> GenerationResult:
    """Generates continuations for a batch of prompts (strings need `tokenizer`; or lists of ids).

    Sampling controls (docs/GENERATION.md) are keyword arguments (temperature, top_k, top_p,
    min_p, repetition_penalty, presence_penalty, frequency_penalty, no_repeat_ngram_size,
    min_new_tokens, logit_bias, allowed_token_ids, bad_words / bad_words_ids, seed): a scalar
    for all prompts or a list with one value per prompt. Or pass a ready `sampling`.
    EOS defaults to the tokenizer's; `eos_token_id=[]` never stops early. `stop` strings end a
    row even across token boundaries; the text is cut before them unless
    `include_stop_str_in_output`. `repeat_count` R > 0 ends a row whose last tokens repeat one
    n-gram R times; `stop_fn(history) -> bool[B]` is a user predicate (a static, pure JAX function).
    `logprobs=A` returns each token's log-probability and A alternatives.
    `window=W` keeps only the last W tokens in a ring cache (generation may then run past the
    model's context), of which `sinks=S` are the first S tokens (attention sinks); a model with
    a `sliding_window` uses a ring of that size by itself. Prompts are fed `prefill_chunk`
    tokens at a time (0: all at once). `kv_cache_dtype="int8"` stores the cache in int8 with a
    scale per token and head (about half the memory of bfloat16, a quarter of float32).
    `constraint` (a `constraints.Regex`, `Json`, `JsonSchema` or `Choice`, or one per prompt,
    None for free rows) is enforced inside the loop; every output is then verified (`valid`,
    `errors`). `enforce=False` only verifies; `retries=R` re-samples invalid rows up to R times.
    Raises `GenerationError` for input that cannot work (empty prompt, too long for the context).
    """
    options = {k: v for k, v in locals().items() if k not in ("params", "cfg", "prompts", "tokenizer", "sampling_kwargs")}
    *_, result = _generate(params, cfg, prompts, tokenizer, sampling_kwargs, stream=False, **options)

    def run(prompts, sampling_kwargs, **again):
        *_, redo = _generate(params, cfg, prompts, tokenizer, sampling_kwargs, stream=False, **dict(again, retries=0))
        return redo

    for attempt in range(1, retries + 1):  # verify-and-retry: sample the invalid rows again, with new seeds
        result = retry_invalid(run, prompts, sampling_kwargs, options, result, attempt)
    return result


def generate_stream(params, cfg: ModelConfig, prompts, *, tokenizer: Tokenizer, **kwargs) -> Iterator[tuple[int, object]]:
    """Like `generate` (same arguments), but yields `(row, text)` pieces as each chunk of steps finishes.

    Pieces never split a UTF-8 character nor reveal the start of a stop string; each row's
    pieces concatenate to that row's `generate(...).texts[row]`. The last item yielded is
    `(-1, result)` with the complete `GenerationResult`.
    """
    bound = inspect.signature(generate).bind(params, cfg, prompts, tokenizer=tokenizer, **kwargs)
    bound.apply_defaults()
    options = dict(bound.arguments)
    for k in ("params", "cfg", "prompts", "tokenizer"):
        options.pop(k)
    sampling_kwargs = options.pop("sampling_kwargs")
    yield from _generate(params, cfg, prompts, tokenizer, sampling_kwargs, stream=True, **options)


def _generate(
    params, cfg, prompts, tokenizer, sampling_kwargs, *, stream: bool, max_new_tokens, num_return_sequences, stop,
    include_stop_str_in_output, eos_token_id, repeat_count, stop_fn, logprobs, sampling, add_bos, parse_special, chunk,
    window, sinks, prefill_chunk, kv_cache_dtype, constraint=None, enforce=True, retries=0,
):
    if logprobs is not None and not 0 <= logprobs <= 20:
        raise GenerationError(f"logprobs must be in [0, 20], got {logprobs}")
    if not isinstance(retries, int) or retries < 0 or (retries and (stream or sampling is not None)):
        raise GenerationError(f"retries must be an int >= 0 (and without streaming or a ready `sampling`), got {retries}")
    include_stop = include_stop_str_in_output
    spec = CacheSpec(window=window, sinks=sinks, prefill_chunk=prefill_chunk, dtype=kv_cache_dtype or "").check(cfg)
    req = _prepare(
        cfg, prompts, tokenizer, max_new_tokens=max_new_tokens, n=num_return_sequences, stop=stop,
        eos_token_id=eos_token_id, repeat_count=repeat_count, add_bos=add_bos, parse_special=parse_special,
        sampling=sampling, sampling_kwargs=_split_kwargs(tokenizer, dict(sampling_kwargs)), chunk=chunk, spec=spec,
        constraint=constraint, enforce=enforce,
    )
    timing: dict = {}
    text = TextStream(tokenizer, req.prompts, req.stop_strings, include_stop) if stream else None
    for state in _run(params, cfg, req, chunk=chunk, num_alternatives=logprobs or 0, stop_fn=stop_fn, timing=timing, spec=spec):
        if stream:
            yield from text.pieces(state)
    result = collect(state, req, tokenizer, logprobs, include_stop, timing)
    yield (-1, result) if stream else result
