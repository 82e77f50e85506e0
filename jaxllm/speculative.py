"""Speculative decoding: G tokens are drafted, the target checks them in one forward.

Legend: B batch, G = γ drafted tokens per block, V vocab.

One block, inside a jit-compiled `lax.while_loop` (a chunk of blocks per host round trip):

    draft:  x_1..x_{G+1} ~ q_0..q_G, from one of
            a draft model: feed the last token, then its own proposals (G + 1 draft forwards)
            prompt lookup: the tokens that followed the last earlier occurrence of the row's
              last n tokens in its prompt and output (`lookup`; q one-hot, no forward)
    target: one forward over [last, x_1..x_G] -> p_0..p_G
    accept: x_{j+1} with probability min(1, p_j(x) / q_j(x)); at the first rejection draw from
            normalize(max(0, p_j - q_j)). Position G, where no drafted token follows, is decided
            the same way with x_{G+1} (in place of the usual bonus draw from p_G): every output
            position is decided by one rule, whatever block it falls in
    each row keeps its n accepted drafts and one more token; the caches roll back past them
            (`kvcache.rewind` at each row's own cursor)

p and q are the *processed* distributions: the whole sampling chain of sampling.py applied
to both, with history-dependent processors seeing the drafted tokens. Greedy rows use
one-hot distributions, so acceptance means "the drafted token is the target's argmax" and
the output equals the target's own greedy output token for token.

Rows accept different numbers of tokens, and each keeps its own: the caches and the history
have one cursor and one step per row (`kvcache.per_row`, `sampling.per_row`), so a row moves on
by its n + 1 tokens (its accepted drafts and its accepted draft or residual draw after them).
The random numbers deciding a row's token at output position t (its draft draw, acceptance
test and residual draw) come from the row's own key folded with t, never with the block: so a
row's tokens do not depend on where blocks start, hence not on its batch mates, and the same
seed gives the same output whatever else is in the batch (as in `generate`, up to float
rounding of p and q on a boundary). Each token is distributed as the target's processed
distribution given the row's previous tokens; its draws differ from `generate`'s, so a sampled
row differs from the target alone with the same seed.

The target (and the draft model, if any) start from `generate.init_state`, with the cache the
request asks for (ring, sinks, int8) and G + 1 columns of lookahead; the target's state is a `DecodeState`, so stops,
log-probabilities and streaming work as in `generate`.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Iterator

import jax
import jax.numpy as jnp

from jaxllm import devices, kvcache, sampling
from jaxllm.compilation import Compiled
from jaxllm.config import ModelConfig
from jaxllm.errors import GenerationError
from jaxllm.generate import DecodeState, GenerationResult, bucket, emit, init_state, left_pad
from jaxllm.kvcache import KVCache
from jaxllm.model import forward
from jaxllm.request import SPECULATIVE, Draft, RequestError, prepare
from jaxllm.request import make as make_request
from jaxllm.results import TextStream, collect
from jaxllm.sampling import (
    NEG_INF, History, SamplingParams, draw, first_argmax, last_tokens, process_logits, record, row_keys, warp,
)
from jaxllm.stopping import CONSTRAINT, RUNNING
from jaxllm.structured import constraints
from jaxllm.tokenizer import Tokenizer


def distribution(
    logits: jax.Array, sp: SamplingParams, history: History, eos_ids: jax.Array, allowed: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """(p [B, V], logprobs [B, V]): the processed next-token distribution `choose_next` samples from
    (one-hot when greedy) and the log-probabilities it reports (as `generate`'s `logprobs`).

    `allowed` [B, V]: a constraint's mask, applied first (as in `generate.decode_step`).
    """
    if allowed is not None:
        logits = jnp.where(allowed, logits, NEG_INF)
    z = process_logits(logits, sp, history, eos_ids)
    greedy = (sp.temperature == 0)[:, None]
    top = jax.nn.one_hot(first_argmax(z), z.shape[-1])

    def sampled(z):
        warped = warp(z, sp)
        return jnp.where(greedy, top, jax.nn.softmax(warped, axis=-1)), jnp.where(greedy, z, warped)

    # an all-greedy batch skips the warp (top-k/top-p over the vocabulary), G + 1 times a block
    p, final = jax.lax.cond(jnp.all(greedy), lambda z: (top, z), sampled, z)
    return p, jax.nn.log_softmax(final, axis=-1)


DRAFT, ACCEPT, RESIDUAL = 1, 2, 3  # what a row's random number at an output position is for


def _keys(sp: SamplingParams, position: jax.Array, purpose: int) -> jax.Array:
    """[B] keys: each row's own, for output position `position` ([] int, or [B]: each row's) and one purpose."""
    return jax.vmap(lambda k: jax.random.fold_in(k, purpose))(row_keys(sp, position))


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["out", "last", "draft_cache", "block", "proposed", "accepted", "row_blocks"],
    meta_fields=[],
)
@dataclasses.dataclass(frozen=True)
class SpecState:
    out: DecodeState  # the target's, with per-row steps and cache cursors (its `logits` are unused after the first token)
    last: jax.Array  # [B] the newest token, emitted but not yet fed to either model
    draft_cache: KVCache | None  # the draft model's (per-row cursors); None with prompt lookup
    block: jax.Array  # [] blocks done
    proposed: jax.Array  # [] draft tokens proposed to running rows
    accepted: jax.Array  # [] of those, accepted by the rule
    row_blocks: jax.Array  # [] target forwards summed over the rows running in them


def lookup(history: History, max_ngram: int, count: int) -> jax.Array:
    """Prompt-lookup drafts [B, count]: the tokens that followed the most recent earlier occurrence
    of the row's last n tokens in its prompt and output, for the largest n <= `max_ngram` that
    occurs. A continuation that runs into the present repeats the matched stretch (the text
    is periodic there); a row with no match proposes its last token again.
    """
    tokens, valid = history.tokens, history.valid
    B, S = tokens.shape
    end = jnp.broadcast_to(history.prompt_len + history.step, (B,))[:, None]  # [B, 1] columns filled
    suffix, suffix_ok = last_tokens(history, max_ngram)  # [B, M], oldest first
    column = jnp.arange(S)
    same = jnp.ones((B, S), bool)
    best = jnp.full((B,), -1)  # the column where the chosen match ends
    for i in range(1, max_ngram + 1):  # static: column j matches the last i tokens when tokens[j - i + 1 ..] equal them
        shifted = jnp.pad(tokens, ((0, 0), (i - 1, 0)))[:, :S]
        shifted_ok = jnp.pad(valid, ((0, 0), (i - 1, 0)))[:, :S]
        same = same & shifted_ok & (shifted == suffix[:, max_ngram - i, None]) & suffix_ok[:, max_ngram - i, None]
        ends = jnp.max(jnp.where(same & (column < end - 1), column, -1), axis=1)  # most recent, not the suffix itself
        best = jnp.where(ends >= 0, ends, best)  # a longer match wins
    start = best[:, None] + 1
    period = jnp.maximum(end - start, 1)
    idx = jnp.clip(start + jnp.arange(count) % period, 0, S - 1)
    last = jnp.take_along_axis(tokens, jnp.clip(end - 1, 0, S - 1), axis=1)
    return jnp.where(best[:, None] >= 0, jnp.take_along_axis(tokens, idx, axis=1), last)


def _constrain(auto, rows, stops, emitted):
    """(mask [B, V], Step) for the next token, `emitted` [B] tokens into the output; (None, None) when free."""
    if auto is None:
        return None, None
    return constraints.mask(auto, rows, stops.eos_ids, stops.max_new_tokens - emitted - 1)


def _block(
    tparams, tcfg, dparams, dcfg, state: SpecState, sp, stops, auto=None,
    *, gamma: int, pad_id: int, lookup_ngram: int = 0, batch_minimum: bool = False,
) -> SpecState:
    """One block for every running row: draft G + 1 tokens ([B, G + 1]; by prompt lookup when
    `lookup_ngram`, else with the draft model `dparams, dcfg`), score them in one target forward
    ([B, G + 1, V]), and emit each row's accepted drafts and one more token."""
    out = state.out
    B, V = state.last.shape[0], tcfg.vocab_size
    rows = jnp.arange(B)
    running = out.finish == RUNNING
    pos0 = out.next_pos  # [B] position of `last`
    first = out.step  # [B] output position of each row's first new token in this block
    drafts = lookup(out.history, lookup_ngram, gamma + 1) if lookup_ngram else None

    # 1. propose x_1..x_{G+1} with their distributions q_0..q_G: the draft model samples them, seeing
    # its own proposals in the history; prompt lookup proposes them outright (q one-hot). With a
    # constraint, the masks (and automaton states) along the drafted path serve the target too
    def draft_step(carry, j):
        cache, token, history, states = carry
        allowed, outcome = _constrain(auto, states, stops, first + j)
        if drafts is None:
            logits, cache = forward(dparams, dcfg, token[:, None], (pos0 + j)[:, None], cache)
            q, _ = distribution(logits[:, 0], sp, history, stops.eos_ids, allowed)
            x = draw(q, _keys(sp, first + j, DRAFT))
        else:
            x = drafts[:, j]
            q = jax.nn.one_hot(x, V)
        after = states if auto is None else constraints.advance(auto, states, outcome, x, running)
        history = history if drafts is not None else record(history, x, running)  # the draft model's processors read it
        return (cache, x, history, after), (x, q, allowed, states, outcome)

    (dcache, _, _, _), (xs, qs, masks, path, outcomes) = jax.lax.scan(
        draft_step, (state.draft_cache, state.last, out.history, out.constraint), jnp.arange(gamma + 1)
    )
    xs, qs = xs.T, jnp.moveaxis(qs, 0, 1)  # [B, G + 1], [B, G + 1, V]

    # 2. the target scores every position in one forward
    fed = jnp.concatenate([state.last[:, None], xs[:, :gamma]], axis=1)  # [B, G + 1]
    logits, tcache = forward(tparams, tcfg, fed, pos0[:, None] + jnp.arange(gamma + 1), out.cache)

    def target_dist(history, j):
        p, logp = distribution(logits[:, j], sp, history, stops.eos_ids, None if auto is None else masks[j])
        return record(history, xs[:, j], running), (p, logp)

    _, (ps, logps) = jax.lax.scan(target_dist, out.history, jnp.arange(gamma + 1))
    ps, logps = jnp.moveaxis(ps, 0, 1), jnp.moveaxis(logps, 0, 1)  # [B, G + 1, V]

    # 3. accept each x_{j+1} with probability min(1, p_j/q_j); each row keeps its n leading accepts
    # among the G drafts the target saw the continuation of (`batch_minimum`: the fewest any running
    # row accepted, for every row: what a cursor shared by the batch allows; benchmarks compare)
    p_x = jnp.take_along_axis(ps, xs[..., None], axis=2)[..., 0]
    q_x = jnp.take_along_axis(qs, xs[..., None], axis=2)[..., 0]
    u = jax.vmap(lambda j: jax.vmap(jax.random.uniform)(_keys(sp, first + j, ACCEPT)))(jnp.arange(gamma + 1)).T
    ok = u * q_x < p_x  # u < p/q without dividing by a zero q
    count = jnp.sum(jnp.cumprod(ok, axis=1), axis=1)  # [B] leading accepts, 0..G+1
    n = jnp.minimum(count, gamma)
    if batch_minimum:
        n = jnp.broadcast_to(jnp.min(jnp.where(running, n, gamma)), (B,))

    # 4. each row's (n+1)-th token: its accepted draft, else a draw from the residual
    p_n, q_n = ps[rows, n], qs[rows, n]
    residual = jnp.maximum(p_n - q_n, 0.0)
    residual = jnp.where(jnp.sum(residual, axis=-1, keepdims=True) > 0, residual, p_n)
    new = jnp.where(count > n, xs[rows, n], draw(residual, _keys(sp, first + n, RESIDUAL)))

    # 5. each row emits its x_1..x_n and the new token, each checked against the stop conditions in order
    tokens = xs.at[rows, n].set(new)  # [B, G + 1]

    def emit_one(out, j):
        emits = j <= n
        if auto is not None:  # a row whose constraint allows nothing here ends
            stuck = emits & (out.finish == RUNNING) & ~jnp.any(masks[j], axis=-1)
            out = dataclasses.replace(out, finish=jnp.where(stuck, CONSTRAINT, out.finish))
        out = jax.lax.cond(
            jnp.any(emits & (out.finish == RUNNING)),  # once every row is done, nothing is recorded
            lambda o: emit(o, tokens[:, j], logps[:, j], stops, pad_id=pad_id, active=emits),
            lambda o: o,
            out,
        )
        return out, None

    out, _ = jax.lax.scan(emit_one, dataclasses.replace(out, cache=tcache), jnp.arange(gamma + 1))
    if auto is not None:  # the automaton state after x_1..x_n and the new token
        at_n = lambda tree: jax.tree_util.tree_map(lambda x: x[n, rows], tree)
        out = dataclasses.replace(out, constraint=constraints.advance(auto, at_n(path), at_n(outcomes), new, running))

    # 6. each row takes back what both caches hold past its n + 1 tokens (a finished row keeps none)
    kept = jnp.where(running, n + 1, 0)
    back = lambda cache: None if cache is None else kvcache.rewind(cache, cache.cursor - (gamma + 1) + kept, gamma + 1)
    out = dataclasses.replace(out, next_pos=pos0 + kept, cache=back(out.cache))
    return SpecState(
        out=out,
        last=jnp.where(running, new, state.last),
        draft_cache=back(dcache),
        block=state.block + 1,
        proposed=state.proposed + gamma * jnp.sum(running),
        accepted=state.accepted + jnp.sum(jnp.where(running, jnp.minimum(count, gamma), 0)),  # by the rule, either way
        row_blocks=state.row_blocks + jnp.sum(running),
    )


def _start(
    tparams, dparams, prompt, prompt_pos, sp, stops, auto=None, constraint=None,
    *, tcfg, dcfg, gamma, buffer_len, num_alternatives, spec, pad_id, lookup_ngram: int = 0,
) -> SpecState:
    """Prefill the target (and the draft model: `init_state`, G + 1 columns of lookahead), give both
    caches and the history per-row cursors and steps, and emit the first token from the target."""
    init = dict(buffer_len=buffer_len, spec=spec, lookahead=gamma + 1)
    out = init_state(tparams, tcfg, prompt, prompt_pos, stops, num_alternatives=num_alternatives, constraint=constraint, **init)
    out = dataclasses.replace(out, cache=kvcache.per_row(out.cache), history=sampling.per_row(out.history))
    draft = None if lookup_ngram else kvcache.per_row(init_state(dparams, dcfg, prompt, prompt_pos, stops, **init).cache)
    allowed, outcome = _constrain(auto, constraint, stops, jnp.zeros_like(out.finish))
    p, logp = distribution(out.logits, sp, out.history, stops.eos_ids, allowed)
    first = draw(p, _keys(sp, jnp.int32(0), RESIDUAL))
    if auto is not None:
        stuck = ~jnp.any(allowed, axis=-1)
        out = dataclasses.replace(out, finish=jnp.where(stuck, CONSTRAINT, out.finish))
        out = dataclasses.replace(out, constraint=constraints.advance(auto, constraint, outcome, first, ~stuck))
    out = emit(out, first, logp, stops, pad_id=pad_id)
    zero = jnp.zeros((), jnp.int32)
    return SpecState(out=out, last=first, draft_cache=draft, block=zero, proposed=zero, accepted=zero, row_blocks=zero)


def _blocks(
    tparams, dparams, state: SpecState, sp, stops, auto=None,
    *, tcfg, dcfg, gamma, pad_id, chunk, lookup_ngram: int = 0, batch_minimum: bool = False,
) -> SpecState:
    """Blocks until some running row has `chunk` more tokens out, or every row is done."""
    end = state.out.step + chunk  # [B]
    step = functools.partial(_block, gamma=gamma, pad_id=pad_id, lookup_ngram=lookup_ngram, batch_minimum=batch_minimum)
    running = lambda s: s.out.finish == RUNNING
    return jax.lax.while_loop(
        lambda s: jnp.any(running(s)) & ~jnp.any(running(s) & (s.out.step >= end)),
        lambda s: step(tparams, tcfg, dparams, dcfg, s, sp, stops, auto),
        state,
    )


_start_program = Compiled(_start)
_blocks_program = Compiled(_blocks, donate_argnames=("state",))


def _check(cfg, draft_cfg, gamma, spec, req, max_new_tokens):
    if draft_cfg is None:
        return
    if draft_cfg.vocab_size != cfg.vocab_size:
        raise GenerationError(f"the draft's vocab_size ({draft_cfg.vocab_size}) differs from the target's ({cfg.vocab_size})")
    longest = max(map(len, req.prompts)) + max_new_tokens
    if longest + gamma + 1 > draft_cfg.max_seq_len and not spec.ring_size(draft_cfg):
        raise GenerationError(f"the draft's context ({draft_cfg.max_seq_len}) is too short for {longest} tokens plus {gamma + 1} drafted")


def _run(
    params, cfg, draft_params, draft_cfg, req, *, gamma, chunk, logprobs, spec, timing, lookup_ngram=0, batch_minimum=False,
) -> Iterator[SpecState]:
    """Prefill, then one jitted chunk of blocks at a time until every row is done; yields after each chunk."""
    tokens, positions = left_pad(req.prompts, bucket(max(map(len, req.prompts))), req.pad_id)
    tparams = devices.prepare(params, cfg)
    dparams = None if draft_cfg is None else devices.prepare(draft_params, draft_cfg)
    models = dict(tcfg=cfg, dcfg=draft_cfg, gamma=gamma, pad_id=req.pad_id, lookup_ngram=lookup_ngram)
    t0 = time.perf_counter()
    state, compile_s = _start_program(
        dict(models, buffer_len=req.buffer_len, num_alternatives=logprobs or 0, spec=spec),
        tparams=tparams, dparams=dparams, prompt=jax.device_put(tokens), prompt_pos=jax.device_put(positions),
        sp=req.sampling, stops=req.stops, auto=req.automaton, constraint=req.row_states,
    )
    jax.block_until_ready(state.last)
    timing["compile_s"] = compile_s
    timing["prefill_s"] = time.perf_counter() - t0 - compile_s  # as `generate` reports it: decode_s starts after
    t0, blocks_compile_s = time.perf_counter(), 0.0
    while True:
        state, compile_s = _blocks_program(
            dict(models, chunk=chunk, batch_minimum=batch_minimum), tparams=tparams, dparams=dparams, state=state, sp=req.sampling, stops=req.stops,
            auto=req.automaton,
        )
        done = not bool(jax.device_get(jnp.any(state.out.finish == RUNNING)))
        blocks_compile_s += compile_s
        timing["compile_s"] += compile_s
        timing["decode_s"] = time.perf_counter() - t0 - blocks_compile_s
        yield state
        if done:
            return


def _generate(params, cfg, draft_params, draft_cfg, request, tokenizer, *, stream: bool, batch_minimum: bool = False):
    """Both entry points (and `generate` with prompt lookup): result, or stream pieces then (-1, result).
    `batch_minimum`: every row keeps the fewest drafts any row accepted (benchmarks/speculative.py
    compares it with each row keeping its own)."""
    gamma = request.value("num_speculative_tokens")
    req = prepare(request, cfg, tokenizer, SPECULATIVE)
    _check(cfg, draft_cfg, gamma, req.spec, req, request.max_new_tokens)
    text = TextStream(tokenizer, req.prompts, req.stop_strings, request.include_stop_str_in_output) if stream else None
    timing: dict = {}
    for state in _run(params, cfg, draft_params, draft_cfg, req, gamma=gamma, chunk=request.chunk,
                      logprobs=request.logprobs, spec=req.spec, timing=timing,
                      lookup_ngram=request.prompt_lookup_max, batch_minimum=batch_minimum):
        if stream:
            yield from text.pieces(state.out)
    blocks, row_blocks, proposed, accepted = (
        int(x) for x in jax.device_get((state.block, state.row_blocks, state.proposed, state.accepted))
    )
    result = collect(state.out, req, tokenizer, timing)
    generated = sum(map(len, result.token_ids))
    timing.update(  # the first token of each row comes from the prefill, not from a block
        acceptance_rate=accepted / proposed if proposed else 1.0,
        tokens_per_block=(generated - len(result.token_ids)) / row_blocks if row_blocks else 0.0,
        target_forwards=blocks,
    )
    yield (-1, result) if stream else result


def _request(request, options, draft_params, draft_cfg):
    """The request, with the draft model (if given) as its `draft`; refused unless something drafts."""
    if draft_cfg is not None:
        options = dict(options, draft=Draft(draft_params, draft_cfg))
    request = make_request(request, options)
    if request.mode != SPECULATIVE:
        raise RequestError("speculative decoding needs a draft model or {prompt_lookup_max}")
    return request


def speculative_generate(
    params, cfg: ModelConfig, draft_params, draft_cfg: ModelConfig | None, request, *,
    tokenizer: Tokenizer | None = None, batch_minimum: bool = False, **options,
) -> GenerationResult:
    """Like `generate`, with `num_speculative_tokens` tokens drafted per target forward: by a draft
    model (`draft_params, draft_cfg`, sharing the target's vocabulary), or with no draft model
    (`None, None`) by prompt lookup (`prompt_lookup_max=N`: the tokens that followed the last
    occurrence of the output's last N..1 tokens in the prompt or output).

    `request`: a `request.Request`, or its prompts with the other fields as keyword `options`, as in
    `generate`. Greedy rows: the target's own output, token for token. Sampled rows: each token
    follows the target's processed distribution (not the target alone's draws). Each row keeps
    the drafts it accepted, so a row's output depends only on its prompt, settings and seed, not
    on its batch mates. `logprobs`, `num_return_sequences`, stops, `constraint` (drafts and
    target see the same masks) and the cache options (`window`, `sinks`, `prefill_chunk`,
    `kv_cache_dtype`, applied to both models) work as in `generate`. `result.timing` adds
    `acceptance_rate` (drafted tokens the rule accepted), `tokens_per_block` (tokens a row
    keeps per target forward) and `target_forwards`.

    `batch_minimum=True` is for comparison only: every row keeps the fewest drafts any running
    row accepted, as a cache cursor shared by the batch would force (same output, more forwards).
    """
    request = _request(request, options, draft_params, draft_cfg)
    if request.stream:
        raise RequestError("{stream} needs speculative_generate_stream (speculative_generate returns only the finished result)")
    *_, result = _generate(params, cfg, draft_params, draft_cfg, request, tokenizer, stream=False, batch_minimum=batch_minimum)
    return result


def speculative_generate_stream(
    params, cfg: ModelConfig, draft_params, draft_cfg: ModelConfig | None, request, *, tokenizer: Tokenizer, **options,
) -> Iterator[tuple[int, object]]:
    """`speculative_generate` as `generate_stream` streams: `(row, text)` pieces after each chunk of
    blocks (each row's pieces concatenate to its text), then `(-1, result)`."""
    request = _request(request, options, draft_params, draft_cfg)
    yield from _generate(params, cfg, draft_params, draft_cfg, request, tokenizer, stream=True)
