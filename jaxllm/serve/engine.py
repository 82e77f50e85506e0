"""Continuous batching: a fixed set of slots shares one compiled decode program; requests join
and leave between chunks of decode steps.

Legend: S slots, C columns per slot (the context: prompt + output), V vocab, A logprob
alternatives, P a prompt's padded length.

    submit(job) ─▶ bounded queue ─▶ the engine's thread, in a loop:
        admit: a waiting job whose rows fit in free slots is prefilled (one batch-1 forward over
               its prompt) and copied into its slots' rows of the shared state
        decode: one chunk of up to `chunk` steps (one right after a join) over the first slots,
               up to the last that holds a running job (`decode_slots`)
        hand out: each job's new text (`results.TextStream`); a finished job gets its result
               and leaves at once, a cancelled one (its client went away) too

The shared state is generate.py's `DecodeState` for S rows, with each row moving at its own
pace: the KV cache has one write cursor per row (`kvcache.per_row`) and the history one step
counter per row (`sampling.per_row`). A slot's prompt is moved to the front of its row when it
joins, so a row's columns are [prompt, output] from column 0 and C columns hold any request
that fits the context. Sampling values, stop strings and constraints are arrays with a row per
slot, so a new request's values change no program. A chunk computes only the first rows that
hold running jobs, and attention reads only the columns some row has reached (`KVCache.view`),
each rounded up to a power of two: a chunk compiles once per (rows, view) pair, a few, and then
runs for any mix of requests.

A row's output depends only on its own request: its prefill runs alone, its decode rows read
only their own cache and values, and its random stream is its own seed folded with its own
step. The same seed gives the same output whatever else is running, up to the floating-point
differences between the programs of different (rows, view) buckets (the tests, which compare
every reply with `generate` alone, have found none).
"""

from __future__ import annotations

import dataclasses
import itertools
import queue
import threading
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import devices, kvcache, sampling
from jaxllm.compilation import Compiled
from jaxllm.config import ModelConfig
from jaxllm.errors import JaxllmError
from jaxllm.generate import MIN_PROMPT_BUCKET as MIN_PROMPT, DecodeState, all_done, decode_step, left_pad
from jaxllm.kvcache import init_cache
from jaxllm.model import prefill, prefill_length, unembed
from jaxllm.request import SAMPLE, Prepared, Request, prepare
from jaxllm.results import GenerationResult, TextStream, collect
from jaxllm.sampling import SamplingParams, init_history, pow2_bucket
from jaxllm.stopping import LENGTH, RUNNING, StopParams
from jaxllm.structured import constraints
from jaxllm.tokenizer import Tokenizer

MAX_EOS = 4  # EOS ids per request (the tokenizer's, and a chat template's end of turn)
FREE = LENGTH  # the finish code of an empty slot: any code but RUNNING keeps it out of the steps
MIN_VIEW = 64  # the fewest columns attention reads
# SamplingParams fields with a row per slot (the multi-token bad words are shared, and unused here)
ROW_FIELDS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty",
              "no_repeat_ngram_size", "min_new_tokens", "key", "bias")


class EngineError(Exception):
    """A request the engine cannot take (the HTTP layer answers 4xx/503 with its message)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------------------- device programs (pure)


def empty_state(cfg: ModelConfig, slots: int, columns: int, window: int, alternatives: int, kv_dtype: str) -> DecodeState:
    """S empty slots of C columns each: per-row cursors and steps, every row finished (FREE)."""
    S, C = slots, columns
    history = sampling.per_row(init_history(jnp.zeros((S, C), jnp.int32), jnp.zeros((S, C), bool), C, cfg.vocab_size))
    return DecodeState(
        logits=jnp.zeros((S, cfg.vocab_size), jnp.float32),
        history=history,
        finish=jnp.full((S,), FREE, jnp.int32),
        next_pos=jnp.zeros((S,), jnp.int32),
        window=jnp.zeros((S, window), jnp.uint8),
        filled=jnp.zeros((S,), jnp.int32),
        logprobs=jnp.zeros((S, C), jnp.float32),
        top_ids=jnp.zeros((S, C, alternatives), jnp.int32),
        top_logprobs=jnp.zeros((S, C, alternatives), jnp.float32),
        cache=kvcache.per_row(init_cache(cfg, S, C, kv_dtype or None)),
        constraint=constraints.RowState(*(jnp.zeros((S,), jnp.int32) for _ in range(3))),
    )


def prompt_bucket(n: int, context: int) -> int:
    """The prompt block a prompt of n tokens is prefilled in: 16, 24, 32, 48, 64, 96, ... (powers of
    two and 1.5 times them, at most `context`). Padding is then under a third of a block, where
    `generate.bucket`'s powers of two leave up to half: a prefill is compute, and the server's
    prefills are much of its work under load. Twice the programs of powers of two (`warmup`)."""
    b = MIN_PROMPT
    while b < n:
        b = b * 3 // 2 if b & (b - 1) == 0 else b // 3 * 4
    return min(b, context)


def _put_row(buf: jax.Array, row: jax.Array, slot: jax.Array, axis: int = 0) -> jax.Array:
    """buf with `row` (buf's shape with 1 on `axis`, or less along later axes: written from 0) at `slot`."""
    start = tuple(slot if d == axis else 0 for d in range(buf.ndim))
    return jax.lax.dynamic_update_slice(buf, row.astype(buf.dtype), start)


def admit(
    params, cfg: ModelConfig, state: DecodeState, sp: SamplingParams, stops: StopParams, slot: jax.Array,
    prompt: jax.Array, prompt_pos: jax.Array, row_sp: SamplingParams, row_stops: dict, row_constraint: constraints.RowState,
    *, prefill_chunk: int, kv_dtype: str,
) -> tuple[DecodeState, SamplingParams, StopParams]:
    """Prefills one left-padded prompt [1, P] alone and puts it in row `slot` of the shared state,
    with its sampling values (`row_sp`, one row), stops (max_new_tokens, repeat_count,
    stop_bytes [NS, LS], stop_mask) and constraint state.

    The prompt's cache columns move to the front of the row (its padding after them, empty):
    the row's cursor is then its prompt length. Its history row is the prompt right-aligned
    in the prompt block, as `init_history` lays out a batch.
    """
    S, C = state.finish.shape[0], state.history.prompt_len
    n = jnp.sum(prompt_pos >= 0).astype(jnp.int32)
    small = init_cache(cfg, 1, prefill_length(prompt.shape[1], prefill_chunk), kv_dtype or None)
    h, small = prefill(params, cfg, prompt, prompt_pos, small, prefill_chunk)
    shift = small.num_slots - n  # real columns are the last n: roll them to the front
    front = lambda x, axis: jnp.roll(x, -shift, axis=axis)
    big = state.cache
    row_pos = jnp.full((1, C), -1, jnp.int32).at[:, : small.num_slots].set(front(small.pos, 1))
    cache = dataclasses.replace(
        big,
        k=_put_row(big.k, front(small.k, 3), slot, axis=1),
        v=_put_row(big.v, front(small.v, 3), slot, axis=1),
        k_scale=None if big.k_scale is None else _put_row(big.k_scale, front(small.k_scale, 3), slot, axis=1),
        v_scale=None if big.v_scale is None else _put_row(big.v_scale, front(small.v_scale, 3), slot, axis=1),
        pos=_put_row(big.pos, row_pos, slot),
        cursor=big.cursor.at[slot].set(n),
    )
    hist = state.history
    P = prompt.shape[1]
    valid = prompt_pos >= 0
    tokens_row = jnp.zeros((1, hist.tokens.shape[1]), jnp.int32).at[:, C - P : C].set(prompt)
    valid_row = jnp.zeros((1, hist.tokens.shape[1]), bool).at[:, C - P : C].set(valid)
    seen_row = jnp.zeros((1, cfg.vocab_size), bool).at[0, prompt[0]].max(valid[0])
    history = dataclasses.replace(
        hist,
        tokens=_put_row(hist.tokens, tokens_row, slot),
        valid=_put_row(hist.valid, valid_row, slot),
        seen=_put_row(hist.seen, seen_row, slot),
        counts=_put_row(hist.counts, jnp.zeros((1, cfg.vocab_size), jnp.int32), slot),
        step=hist.step.at[slot].set(0),
    )
    one = lambda big_x, row_x: _put_row(big_x, row_x, slot)
    state = dataclasses.replace(
        state,
        logits=_put_row(state.logits, unembed(params, cfg, h), slot),
        history=history,
        finish=state.finish.at[slot].set(RUNNING),
        next_pos=state.next_pos.at[slot].set(n),
        window=_put_row(state.window, jnp.zeros((1, state.window.shape[1]), jnp.uint8), slot),
        filled=state.filled.at[slot].set(0),
        cache=cache,
        constraint=jax.tree_util.tree_map(one, state.constraint, row_constraint),
    )
    sp = dataclasses.replace(sp, **{f: one(getattr(sp, f), getattr(row_sp, f)) for f in ROW_FIELDS})
    stops = dataclasses.replace(stops, **{f: one(getattr(stops, f), v[None]) for f, v in row_stops.items()})
    return state, sp, stops


STOP_ROW_FIELDS = ("eos_ids", "max_new_tokens", "repeat_count", "stop_bytes", "stop_mask")


def decode_slots(
    params, cfg: ModelConfig, state: DecodeState, sp: SamplingParams, stops: StopParams,
    automaton: constraints.Automaton | None = None, steps: jax.Array | int = 1, *, view: int, rows: int, pad_id: int = 0,
) -> DecodeState:
    """Up to `steps` (traced) decode steps over the first `rows` slots (fewer if all are done); attention
    reads the first `view` columns of each row. Both static: the host makes sure every running
    row is among the first `rows` and none passes `view`.

    The first rows' small arrays are sliced out and put back; the cache's keys and values stay
    whole (its `pos` and cursors are sliced): the steps write their rows in place and read only
    those rows' first `view` columns, so a step costs what the running requests need.
    A row that is not running neither moves its cursor nor its position: its steps write one
    column of its own, again and again, that no one reads.
    """
    whole = state
    head = lambda tree: jax.tree_util.tree_map(lambda x: x[:rows], tree)
    cache = dataclasses.replace(state.cache, pos=state.cache.pos[:rows], cursor=state.cache.cursor[:rows], view=view)
    state = dataclasses.replace(head(dataclasses.replace(state, cache=None)), cache=cache)
    sp = dataclasses.replace(sp, **{f: getattr(sp, f)[:rows] for f in ROW_FIELDS})
    stops = dataclasses.replace(stops, **{f: getattr(stops, f)[:rows] for f in STOP_ROW_FIELDS})

    def body(carry):
        i, s = carry
        running = s.finish == RUNNING
        cursor, pos = s.cache.cursor, s.next_pos
        s = decode_step(params, cfg, s, sp, stops, automaton, pad_id=pad_id)
        cache = dataclasses.replace(s.cache, cursor=jnp.where(running, s.cache.cursor, cursor))
        return i + 1, dataclasses.replace(s, cache=cache, next_pos=jnp.where(running, s.next_pos, pos))

    _, state = jax.lax.while_loop(lambda c: (c[0] < steps) & ~all_done(c[1]), body, (jnp.int32(0), state))
    put = lambda big, new: jax.lax.dynamic_update_slice(big, new, (0,) * big.ndim)  # rows [0, rows) back in place
    cache = dataclasses.replace(state.cache, pos=put(whole.cache.pos, state.cache.pos),
                                cursor=put(whole.cache.cursor, state.cache.cursor), view=0)
    rest = jax.tree_util.tree_map(put, dataclasses.replace(whole, cache=None), dataclasses.replace(state, cache=None))
    return dataclasses.replace(rest, cache=cache)


def release(state: DecodeState, rows: jax.Array) -> DecodeState:
    """Marks slots `rows` [k] empty (a cancelled request's, at once)."""
    return dataclasses.replace(state, finish=state.finish.at[rows].set(FREE))


_admit_program = Compiled(admit, donate_argnames=("state", "sp", "stops"))
_chunk_program = Compiled(decode_slots, donate_argnames=("state",))


# ---------------------------------------------------------------------------- host side


@dataclasses.dataclass(eq=False)
class Job:
    """One request in the engine: its prepared rows, and where its text goes.

    `emit(event)` is called from the engine's thread with ("text", row, piece), ("done",
    GenerationResult) or ("error", EngineError); it must not block.
    """

    request: Request
    emit: Callable[[tuple], None]
    prepared: Prepared | None = None
    slots: list[int] = dataclasses.field(default_factory=list)
    cancelled: bool = False
    wants_text: bool = True  # ("text", ...) events as the text grows; False: only the end
    stream: TextStream | None = None
    submitted: float = dataclasses.field(default_factory=time.perf_counter)
    timing: dict = dataclasses.field(default_factory=dict)

    def cancel(self) -> None:
        """Frees the job's slots at the engine's next chunk boundary (a client that went away)."""
        self.cancelled = True


class _Registry:
    """The constraints of recent jobs in one automaton. New ones are appended, so the states of
    rows already running keep their meaning; a full registry restarts from the running jobs'
    constraints and moves those rows' states to the new numbering."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, limit: int = 32):
        self.tokenizer, self.V, self.limit = tokenizer, vocab_size, limit
        self.items: list = []
        self.automaton: constraints.Automaton | None = None
        self.start: list[int] = []

    def _offsets(self) -> list[int]:
        sizes = [constraints.compile_table(c, self.tokenizer).next.shape[0] for c in self.items]
        return list(itertools.accumulate([1] + sizes))[:-1]

    def add(self, constraint, running: list) -> dict | None:
        """Makes `constraint` part of the automaton. -> None, or {old state offset -> new} when the
        registry restarted (the caller moves running rows' states)."""
        if constraint in self.items:
            return None
        moved = None
        items = self.items
        if len(items) >= self.limit:
            old = dict(zip(items, self._offsets()))
            items = list(dict.fromkeys(c for c in running if c is not None))
            moved = {c: old[c] for c in items}
        automaton, rows = constraints.build(items + [constraint], self.tokenizer, self.V)  # may raise: nothing changed
        self.items, self.automaton, self.start = items + [constraint], automaton, np.asarray(rows.state).tolist()
        if moved is not None:
            new = dict(zip(self.items, self._offsets()))
            moved = {c: (off, new[c]) for c, off in moved.items()}
        return moved

    def initial(self, constraint) -> int:
        return 0 if constraint is None else self.start[self.items.index(constraint)]


class Engine:
    """S slots over one model, decoded in chunks on a thread of its own (`start`).

    slots: rows decoded together; context: columns per slot (prompt + output; default the
    model's); chunk: steps between host checks (new requests join, text goes out, cancelled
    requests leave, this often); max_queue: jobs waiting for a slot before `submit` refuses
    (503); max_logprobs: alternatives per token a request may ask for; max_stop /
    max_stop_bytes: stop strings per request (a chat template's included) and their length.
    """

    def __init__(
        self, params, cfg: ModelConfig, tokenizer: Tokenizer, *, slots: int = 8, context: int | None = None,
        chunk: int = 8, max_queue: int = 256, max_logprobs: int = 5, kv_cache_dtype: str = "",
        prefill_chunk: int = 512, max_stop: int = 8, max_stop_bytes: int = 64,
    ):
        if tokenizer is None:
            raise EngineError("the server needs a tokenizer")
        context = context or cfg.max_seq_len
        if not 1 <= context <= cfg.max_seq_len:
            raise EngineError(f"context must be in [1, {cfg.max_seq_len}] (the model's), got {context}")
        self.params, self.cfg, self.tokenizer = devices.prepare(params, cfg), cfg, tokenizer
        self.slots, self.context, self.chunk = slots, context, chunk
        self.max_logprobs, self.kv_dtype, self.prefill_chunk = max_logprobs, kv_cache_dtype, prefill_chunk
        self.max_stop, self.max_stop_bytes = max_stop, pow2_bucket(max_stop_bytes)
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
        self._empty()
        self.registry = _Registry(tokenizer, cfg.vocab_size)
        self.jobs: dict[int, Job] = {}  # slot -> its job
        self.waiting: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self._held: Job | None = None  # a job taken from the queue that waits for enough free slots
        self._stop = threading.Event()
        self._accepting = True
        self._joined = False  # a job joined since the last chunk
        self._thread: threading.Thread | None = None
        self.stats = dict(chunks=0, admitted=0, finished=0, cancelled=0, compile_s=0.0)
        self._placing: Job | None = None  # the job being admitted, not yet in `jobs`

    def _empty(self) -> None:
        """Every slot empty: the shared state and its per-row values as at the start."""
        cfg, slots, tokenizer = self.cfg, self.slots, self.tokenizer
        # Stops with a row per slot: EOS ids (a chat's end of turn is one, a completion's not;
        # padded with V), stop strings right-aligned in [max_stop, max_stop_bytes]
        stops = StopParams.make(slots, 1, [], ["x" * self.max_stop_bytes] * self.max_stop, tokenizer.token_bytes())
        self.stops = dataclasses.replace(
            stops, eos_ids=jnp.full((slots, MAX_EOS), cfg.vocab_size, jnp.int32),
            stop_bytes=jnp.zeros((slots,) + stops.stop_bytes.shape, jnp.uint8),
            stop_mask=jnp.zeros((slots,) + stops.stop_mask.shape, bool),
        )
        self.sp = SamplingParams.make(slots, cfg.vocab_size, seed=0)
        self.state = empty_state(cfg, slots, self.context, self.stops.window, self.max_logprobs, self.kv_dtype)

    # ---------------------------------------------------------------- from the HTTP side (any thread)

    def prepare(self, request: Request, rest_of_context: bool = False) -> Prepared:
        """Checks a request against the model and the engine's limits (raises RequestError/EngineError).
        With `rest_of_context`, the request may generate up to the end of the context (its
        max_new_tokens is set from the prompt's length)."""
        prep = prepare(request.replace(max_new_tokens=1), self.cfg, self.tokenizer, SAMPLE)  # the prompt's length first
        if len(prep.prompts) > self.slots:
            raise EngineError(f"n ({len(prep.prompts)}) is more than the server's {self.slots} slots")
        n = len(prep.prompts[0])
        if rest_of_context:
            if n >= self.context:
                raise EngineError(f"the prompt has {n} tokens, as many as the server's context of {self.context}")
            request = request.replace(max_new_tokens=self.context - n)
        if n + request.max_new_tokens > self.context:
            raise EngineError(f"the prompt has {n} tokens; with max_tokens={request.max_new_tokens} it needs "
                              f"{n + request.max_new_tokens}, more than the server's context of {self.context}")
        prep.request = request
        prep.stops = dataclasses.replace(prep.stops, max_new_tokens=jnp.full((len(prep.prompts),), request.max_new_tokens,
                                                                             jnp.int32))
        encoded = [s.encode() for s in prep.stop_strings]
        if len(encoded) > self.max_stop or any(len(s) > self.max_stop_bytes for s in encoded):
            raise EngineError(f"stop: at most {self.max_stop} strings (a chat template's included) of at most "
                              f"{self.max_stop_bytes} bytes each")
        if (request.logprobs or 0) > self.max_logprobs:
            raise EngineError(f"logprobs: at most {self.max_logprobs} alternatives per token on this server")
        if request.verify_only or request.retries:
            raise EngineError("verify_only and retries are not served")
        if prep.stops.eos_ids.shape[0] > MAX_EOS:
            raise EngineError(f"at most {MAX_EOS} EOS ids per request")
        return prep

    def submit(self, job: Job) -> None:
        """Queues a job (its `prepared` set); raises EngineError(503) when the queue is full or the engine stops."""
        if not self._accepting:
            raise EngineError("the server is shutting down", 503)
        try:
            self.waiting.put_nowait(job)
        except queue.Full:
            raise EngineError(f"the server is busy: {self.waiting.maxsize} requests are waiting", 503) from None

    @property
    def queued(self) -> int:
        return self.waiting.qsize() + (self._held is not None)

    @property
    def busy_slots(self) -> int:
        return len(self.jobs)

    def warmup(self) -> dict:
        """Compiles (or loads from the persistent cache) every program serving can need before the
        first request: the prefill-and-join program for each prompt bucket, and the decode chunk for
        each number of rows and view, unconstrained. Call before `start`. -> {"programs", "seconds"}"""
        t, programs = time.perf_counter(), 0
        for P in sorted({prompt_bucket(n, self.context) for n in range(1, self.context)}):
            job = Job(Request([1] * P if P < self.context else [1] * (P - 1), max_new_tokens=1, temperature=0),
                      lambda e: None)
            job.prepared = self.prepare(job.request)
            self._place(job)  # unconstrained: nothing to join
            self.state = release(self.state, jnp.asarray(job.slots))
            self._free(job.slots)
            programs += 1
        views = sorted({min(self.context, max(MIN_VIEW, pow2_bucket(c))) for c in range(1, self.context + 1)})
        for rows in sorted({min(self.slots, pow2_bucket(n)) for n in range(1, self.slots + 1)}):
            for view in views:
                self.state, _ = _chunk_program(
                    dict(cfg=self.cfg, view=view, rows=rows, pad_id=self.pad_id),
                    params=self.params, state=self.state, sp=self.sp, stops=self.stops, automaton=None,
                    steps=jnp.int32(self.chunk),
                )
                programs += 1
        jax.block_until_ready(self.state.logits)
        self.stats["admitted"], self._joined = 0, False
        return dict(programs=programs, seconds=time.perf_counter() - t)

    # ---------------------------------------------------------------- the loop (the engine's thread)

    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._loop, name="jaxllm-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, grace: float = 0.0) -> None:
        """Stops taking requests, lets running ones finish for up to `grace` seconds, then cancels
        the rest and every queued one, and stops the thread."""
        self._accepting = False
        deadline = time.monotonic() + grace
        while grace and self.jobs and time.monotonic() < deadline:
            time.sleep(0.05)
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        for job in list(self.jobs.values()) + self._drain():
            job.emit(("error", EngineError("the server is shutting down", 503)))
        self.jobs.clear()

    def _drain(self) -> list[Job]:
        jobs = [self._held] if self._held is not None else []
        self._held = None
        while True:
            try:
                jobs.append(self.waiting.get_nowait())
            except queue.Empty:
                return jobs

    @property
    def alive(self) -> bool:
        """Taking requests, with its thread running (once started)."""
        return self._accepting and (self._thread is None or self._thread.is_alive())

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    self._admit_waiting()
                    if not self.jobs:
                        continue
                    self._decode()
                except Exception as e:  # a bug: fail the running jobs (and one being admitted), keep serving
                    failed = EngineError(f"internal error: {type(e).__name__}: {e}", 500)
                    for job in set(self.jobs.values()) | ({self._placing} - {None}):
                        job.emit(("error", failed))
                    self._placing = None
                    self._free(list(self.jobs))
                    self._empty()  # a failed program may have consumed its donated buffers
        finally:  # stopped, or the thread itself failed: no request may wait for it
            self._accepting = False
            if not self._stop.is_set():
                for job in set(self.jobs.values()) | set(self._drain()):
                    job.emit(("error", EngineError("the engine stopped", 500)))
                self.jobs.clear()

    def _admit_waiting(self) -> None:
        """Moves waiting jobs into free slots (blocks briefly when nothing runs); none once stopping."""
        while self._accepting:
            job = self._held
            if job is None:
                try:
                    job = self.waiting.get(timeout=0.05) if not self.jobs else self.waiting.get_nowait()
                except queue.Empty:
                    return
            self._held = None
            if job.cancelled:
                continue
            if len(job.prepared.prompts) > self.slots - len(self.jobs):
                self._held = job  # first come, first served: later jobs wait behind it
                return
            self._placing = job
            try:
                self._join_constraints(job)
            except JaxllmError as e:  # a constraint the shared automaton cannot take: this job alone fails
                job.emit(("error", EngineError(str(e))))
                self._placing = None
                continue
            self._place(job)
            self._placing = None

    def _place(self, job: Job) -> None:
        prep, r = job.prepared, job.request
        free = [s for s in range(self.slots) if s not in self.jobs]
        job.slots = free[: len(prep.prompts)]
        prompt = prep.prompts[0]
        P = prompt_bucket(len(prompt), self.context)
        tokens, positions = left_pad([prompt], P, self.pad_id)
        chunk = self.prefill_chunk if P % self.prefill_chunk == 0 or P <= self.prefill_chunk else 0  # no padding past C
        ns, ls = prep.stops.stop_bytes.shape
        stop_bytes = np.zeros(self.stops.stop_bytes.shape[1:], np.uint8)
        stop_mask = np.zeros(self.stops.stop_mask.shape[1:], bool)
        L = stop_bytes.shape[1]
        stop_bytes[:ns, L - ls :], stop_mask[:ns, L - ls :] = np.asarray(prep.stops.stop_bytes), np.asarray(prep.stops.stop_mask)
        eos = np.full((MAX_EOS,), self.cfg.vocab_size, np.int32)
        eos[: prep.stops.eos_ids.shape[0]] = np.asarray(prep.stops.eos_ids)
        eos = jnp.asarray(eos)
        for row, slot in enumerate(job.slots):
            row_sp = jax.tree_util.tree_map(lambda x: x[row : row + 1], prep.sampling)
            c = prep.constraints[row]
            row_constraint = constraints.RowState(*(jnp.asarray([v], jnp.int32) for v in (self.registry.initial(c), 0, 0)))
            row_stops = dict(max_new_tokens=prep.stops.max_new_tokens[row], repeat_count=prep.stops.repeat_count[row],
                             stop_bytes=jnp.asarray(stop_bytes), stop_mask=jnp.asarray(stop_mask), eos_ids=eos)
            (self.state, self.sp, self.stops), compile_s = _admit_program(
                dict(cfg=self.cfg, prefill_chunk=chunk, kv_dtype=self.kv_dtype),
                params=self.params, state=self.state, sp=self.sp, stops=self.stops, slot=jnp.int32(slot),
                prompt=jnp.asarray(tokens), prompt_pos=jnp.asarray(positions), row_sp=row_sp, row_stops=row_stops,
                row_constraint=row_constraint,
            )
            self.stats["compile_s"] += compile_s
            self.jobs[slot] = job
        job.stream = TextStream(self.tokenizer, prep.prompts, prep.stop_strings, r.include_stop_str_in_output)
        job.timing["queued_s"] = time.perf_counter() - job.submitted
        self._joined = True
        self.stats["admitted"] += 1

    def _join_constraints(self, job: Job) -> None:
        """The job's constraints into the shared automaton (before any of its rows is placed)."""
        running = [self.jobs[s].prepared.constraints[0] for s in self.jobs]
        for c in dict.fromkeys(job.prepared.constraints):
            if c is not None:
                self._renumber(self.registry.add(c, running))

    def _renumber(self, moved: dict | None) -> None:
        """After the registry restarted: running rows' automaton states to the new numbering."""
        if not moved:
            return
        state = np.asarray(self.state.constraint.state).copy()
        for slot, job in self.jobs.items():
            c = job.prepared.constraints[job.slots.index(slot)]
            if c is not None and state[slot] > 0:
                old, new = moved[c]
                state[slot] += new - old
        self.state = dataclasses.replace(
            self.state, constraint=dataclasses.replace(self.state.constraint, state=jnp.asarray(state)))

    def rows(self) -> int:
        """Slots this chunk decodes: the first ones up to the last running job's, rounded up to a
        power of two (jobs take the lowest free slots)."""
        return min(self.slots, pow2_bucket(max(self.jobs) + 1))

    def view(self) -> int:
        """Columns attention must read this chunk: every running row's cursor plus a chunk, rounded up."""
        cursor = np.asarray(self.state.cache.cursor)
        furthest = max(int(cursor[s]) for s in self.jobs) + self.chunk
        return min(self.context, max(MIN_VIEW, pow2_bucket(furthest)))

    def _decode(self) -> None:
        cancelled = [s for s, job in self.jobs.items() if job.cancelled]
        if cancelled:
            self.state = release(self.state, jnp.asarray(cancelled))
            self.stats["cancelled"] += len({id(self.jobs[s]) for s in cancelled})
            self._free(cancelled)
            if not self.jobs:
                return
        automaton = self.registry.automaton if any(c is not None for j in self.jobs.values()
                                                   for c in j.prepared.constraints) else None
        # Right after a request joins, one step: its first token goes out now, not a chunk later
        steps = 1 if self._joined else self.chunk
        self._joined = False
        self.state, compile_s = _chunk_program(
            dict(cfg=self.cfg, view=self.view(), rows=self.rows(), pad_id=self.pad_id),
            params=self.params, state=self.state, sp=self.sp, stops=self.stops, automaton=automaton,
            steps=jnp.int32(steps),
        )
        self.stats["compile_s"] += compile_s
        self.stats["chunks"] += 1
        want_logprobs = any(j.request.logprobs is not None for j in self.jobs.values())
        host = _Rows(self.state, want_logprobs)
        for job in dict.fromkeys(self.jobs.values()):
            rows = host.take(job.slots)
            for row, piece in job.stream.pieces(rows) if job.wants_text else ():
                job.emit(("text", row, piece))
            if np.all(rows.finish != RUNNING):
                job.timing["total_s"] = time.perf_counter() - job.submitted
                job.emit(("done", self._result(job, rows)))
                self.stats["finished"] += 1
                self._free(job.slots)

    def _result(self, job: Job, rows: "_Rows") -> GenerationResult:
        result = collect(rows, job.prepared, self.tokenizer, job.timing)
        if result.top_logprobs is not None:  # the program keeps max_logprobs alternatives; the request asked for k
            k = job.request.logprobs
            result.top_logprobs = [[dict(list(top.items())[:k]) for top in row] for row in result.top_logprobs]
        return result

    def _free(self, slots) -> None:
        for s in slots:
            self.jobs.pop(s, None)


class _Rows:
    """The host's copy of the shared state after a chunk, and the rows of one job from it (what
    `TextStream.pieces` and `results.collect` read)."""

    def __init__(self, state: DecodeState, logprobs: bool):
        names = ("tokens", "length", "finish") + (("logprobs", "top_ids", "top_logprobs") if logprobs else ())
        self.arrays = dict(zip(names, jax.device_get(tuple(getattr(state, n) for n in names))))
        if not logprobs:  # collect reads them only for a request that asked
            S = state.finish.shape[0]
            self.arrays.update(logprobs=np.zeros((S, 0)), top_ids=np.zeros((S, 0, 0)), top_logprobs=np.zeros((S, 0, 0)))

    def take(self, slots: list[int]) -> "_Rows":
        rows = object.__new__(_Rows)
        rows.arrays = {k: v[slots] for k, v in self.arrays.items()}
        return rows

    def __getattr__(self, name):
        try:
            return self.arrays[name]
        except KeyError:
            raise AttributeError(name) from None
