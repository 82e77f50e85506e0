"""Speculative decoding: a small draft model proposes γ tokens, the target checks them in one forward.

Legend: B batch, G = γ drafted tokens per block, V vocab.

One block, inside a jit-compiled `lax.while_loop` (a chunk of blocks per host round trip):

    draft:  feed the last token, then its own proposals: x_1..x_{G+1} ~ q_0..q_G
            (G + 1 draft forwards)
    target: one forward over [last, x_1..x_G] -> p_0..p_G
    accept: x_{j+1} with probability min(1, p_j(x) / q_j(x)); at the first rejection draw from
            normalize(max(0, p_j - q_j)). Position G, where no drafted token follows, is decided
            the same way with x_{G+1} (in place of the usual bonus draw from p_G): every output
            position is decided by one rule, whatever block it falls in
    both caches roll back (`kvcache.rewind`)

p and q are the *processed* distributions: the whole sampling chain of sampling.py applied
to both, with history-dependent processors seeing the drafted tokens. Greedy rows use
one-hot distributions, so acceptance means "the draft's token is the target's argmax" and
the output equals the target's own greedy output token for token.

Rows accept different numbers of tokens, but both caches are written at one cursor shared by
all rows. The batch advances by n + 1 tokens where n is the smallest count any running row
accepted: each row keeps its first n accepted tokens and its own (n+1)-th token (its accepted
draft or its residual draw). The random numbers deciding a row's token at output position t
(its draft draw, acceptance test and residual draw) come from the row's own key folded with
t, never with the block: so a row's tokens do not depend on where blocks start, hence not on
its batch mates, and the same seed gives the same output whatever else is in the batch (as in
`generate`, up to float rounding of p and q on a boundary). Each token is distributed as the
target's processed distribution given the row's previous tokens; its draws differ from
`generate`'s, so a sampled row differs from the target alone with the same seed.

Both models start from `generate.init_state`, with the cache the request asks for (ring,
sinks, int8) and G + 1 columns of lookahead; the target's state is a `DecodeState`, so stops,
log-probabilities and streaming work as in `generate`.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Iterator

import jax
import jax.numpy as jnp

from jaxllm import devices, kvcache
from jaxllm.compilation import Compiled
from jaxllm.config import ModelConfig
from jaxllm.errors import GenerationError
from jaxllm.generate import DecodeState, GenerationResult, bucket, emit, init_state, left_pad
from jaxllm.kvcache import KVCache
from jaxllm.model import forward
from jaxllm.request import SPECULATIVE, Draft, RequestError, prepare
from jaxllm.request import make as make_request
from jaxllm.results import TextStream, collect
from jaxllm.sampling import NEG_INF, History, SamplingParams, draw, first_argmax, process_logits, record, row_keys, warp
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
    warped = warp(z, sp)
    p = jnp.where(greedy, jax.nn.one_hot(first_argmax(z), z.shape[-1]), jax.nn.softmax(warped, axis=-1))
    return p, jax.nn.log_softmax(jnp.where(greedy, z, warped), axis=-1)


DRAFT, ACCEPT, RESIDUAL = 1, 2, 3  # what a row's random number at an output position is for


def _keys(sp: SamplingParams, position: jax.Array, purpose: int) -> jax.Array:
    """[B] keys: each row's own, for output position `position` ([] int) and one purpose."""
    return jax.vmap(lambda k: jax.random.fold_in(k, purpose))(row_keys(sp, position))


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["out", "last", "draft_cache", "block", "proposed", "accepted"],
    meta_fields=[],
)
@dataclasses.dataclass(frozen=True)
class SpecState:
    out: DecodeState  # the target's: history, stops, logprobs, cache (its `logits` are unused after the first token)
    last: jax.Array  # [B] the newest token, emitted but not yet fed to either model
    draft_cache: KVCache
    block: jax.Array  # [] blocks done
    proposed: jax.Array  # [] draft tokens proposed to running rows
    accepted: jax.Array  # [] of those, accepted by the rule (before the batch minimum)


def _constrain(auto, rows, stops, emitted):
    """(mask [B, V], Step) for the next token, `emitted` [B] tokens into the output; (None, None) when free."""
    if auto is None:
        return None, None
    return constraints.mask(auto, rows, stops.eos_ids, stops.max_new_tokens - emitted - 1)


def _block(
    tparams, tcfg, dparams, dcfg, state: SpecState, sp, stops, auto=None, *, gamma: int, pad_id: int
) -> SpecState:
    out = state.out
    B = state.last.shape[0]
    running = out.finish == RUNNING
    pos0 = out.next_pos  # position of `last`
    first = out.step  # output position of the block's first new token

    # 1. the draft proposes x_1..x_{G+1} from q_0..q_G, seeing its own proposals in the history;
    # with a constraint, the masks (and automaton states) along the drafted path serve the target too
    def draft_step(carry, j):
        cache, token, history, rows = carry
        logits, cache = forward(dparams, dcfg, token[:, None], (pos0 + j)[:, None], cache)
        allowed, outcome = _constrain(auto, rows, stops, first + j)
        q, _ = distribution(logits[:, 0], sp, history, stops.eos_ids, allowed)
        x = draw(q, _keys(sp, first + j, DRAFT))
        after = rows if auto is None else constraints.advance(auto, rows, outcome, x, running)
        return (cache, x, record(history, x, running), after), (x, q, allowed, rows, outcome)

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

    # 3. accept each x_{j+1} with probability min(1, p_j/q_j); n = the fewest any running row
    # accepted among the G drafts the target saw the continuation of
    p_x = jnp.take_along_axis(ps, xs[..., None], axis=2)[..., 0]
    q_x = jnp.take_along_axis(qs, xs[..., None], axis=2)[..., 0]
    u = jax.vmap(lambda j: jax.vmap(jax.random.uniform)(_keys(sp, first + j, ACCEPT)))(jnp.arange(gamma + 1)).T
    ok = u * q_x < p_x  # u < p/q without dividing by a zero q
    count = jnp.sum(jnp.cumprod(ok, axis=1), axis=1)  # [B] leading accepts, 0..G+1
    n = jnp.min(jnp.where(running, jnp.minimum(count, gamma), gamma))

    # 4. each row's (n+1)-th token: its accepted draft, else a draw from the residual
    p_n, q_n = ps[:, n], qs[:, n]
    residual = jnp.maximum(p_n - q_n, 0.0)
    residual = jnp.where(jnp.sum(residual, axis=-1, keepdims=True) > 0, residual, p_n)
    new = jnp.where(count > n, xs[:, n], draw(residual, _keys(sp, first + n, RESIDUAL)))

    # 5. emit x_1..x_n and the new token, each checked against the stop conditions in order
    tokens = xs.at[jnp.arange(B), n].set(new)  # [B, G + 1]

    def emit_one(out, j):
        if auto is not None:  # a row whose constraint allows nothing here ends
            stuck = (j <= n) & (out.finish == RUNNING) & ~jnp.any(masks[j], axis=-1)
            out = dataclasses.replace(out, finish=jnp.where(stuck, CONSTRAINT, out.finish))
        out = jax.lax.cond(
            (j <= n) & jnp.any(out.finish == RUNNING),  # once every row is done, nothing is recorded
            lambda o: emit(o, tokens[:, j], logps[:, j], stops, pad_id=pad_id),
            lambda o: o,
            out,
        )
        return out, None

    out, _ = jax.lax.scan(emit_one, dataclasses.replace(out, cache=tcache), jnp.arange(gamma + 1))
    if auto is not None:  # the automaton state after x_1..x_n and the new token
        at_n = lambda tree: jax.tree_util.tree_map(lambda x: x[n], tree)
        out = dataclasses.replace(out, constraint=constraints.advance(auto, at_n(path), at_n(outcomes), new, running))

    # 6. take back what both caches hold past the n + 1 tokens kept
    kept = lambda cache: kvcache.rewind(cache, cache.cursor - gamma + n, gamma + 1)  # G + 1 written, n + 1 kept
    out = dataclasses.replace(out, next_pos=pos0 + n + 1, cache=kept(out.cache))
    return SpecState(
        out=out,
        last=new,
        draft_cache=kept(dcache),
        block=state.block + 1,
        proposed=state.proposed + gamma * jnp.sum(running),
        accepted=state.accepted + jnp.sum(jnp.where(running, jnp.minimum(count, gamma), 0)),
    )


def _start(
    tparams, dparams, prompt, prompt_pos, sp, stops, auto=None, constraint=None,
    *, tcfg, dcfg, gamma, buffer_len, num_alternatives, spec, pad_id,
) -> SpecState:
    """Prefill both models (`init_state`, G + 1 columns of lookahead) and emit the first token from the target."""
    init = dict(buffer_len=buffer_len, spec=spec, lookahead=gamma + 1)
    out = init_state(tparams, tcfg, prompt, prompt_pos, stops, num_alternatives=num_alternatives, constraint=constraint, **init)
    draft = init_state(dparams, dcfg, prompt, prompt_pos, stops, **init).cache
    allowed, outcome = _constrain(auto, constraint, stops, jnp.zeros_like(out.finish))
    p, logp = distribution(out.logits, sp, out.history, stops.eos_ids, allowed)
    first = draw(p, _keys(sp, jnp.int32(0), RESIDUAL))
    if auto is not None:
        stuck = ~jnp.any(allowed, axis=-1)
        out = dataclasses.replace(out, finish=jnp.where(stuck, CONSTRAINT, out.finish))
        out = dataclasses.replace(out, constraint=constraints.advance(auto, constraint, outcome, first, ~stuck))
    out = emit(out, first, logp, stops, pad_id=pad_id)
    zero = jnp.zeros((), jnp.int32)
    return SpecState(out=out, last=first, draft_cache=draft, block=zero, proposed=zero, accepted=zero)


def _blocks(tparams, dparams, state: SpecState, sp, stops, auto=None, *, tcfg, dcfg, gamma, pad_id, chunk) -> SpecState:
    """Blocks until `chunk` more tokens are out or every row is done."""
    end = state.out.step + chunk
    return jax.lax.while_loop(
        lambda s: (s.out.step < end) & jnp.any(s.out.finish == RUNNING),
        lambda s: _block(tparams, tcfg, dparams, dcfg, s, sp, stops, auto, gamma=gamma, pad_id=pad_id),
        state,
    )


_start_program = Compiled(_start)
_blocks_program = Compiled(_blocks, donate_argnames=("state",))


def _check(cfg, draft_cfg, gamma, spec, req, max_new_tokens):
    if draft_cfg.vocab_size != cfg.vocab_size:
        raise GenerationError(f"the draft's vocab_size ({draft_cfg.vocab_size}) differs from the target's ({cfg.vocab_size})")
    longest = max(map(len, req.prompts)) + max_new_tokens
    if longest + gamma + 1 > draft_cfg.max_seq_len and not spec.ring_size(draft_cfg):
        raise GenerationError(f"the draft's context ({draft_cfg.max_seq_len}) is too short for {longest} tokens plus {gamma + 1} drafted")


def _run(params, cfg, draft_params, draft_cfg, req, *, gamma, chunk, logprobs, spec, timing) -> Iterator[SpecState]:
    """Prefill, then one jitted chunk of blocks at a time until every row is done; yields after each chunk."""
    tokens, positions = left_pad(req.prompts, bucket(max(map(len, req.prompts))), req.pad_id)
    tparams, dparams = devices.prepare(params, cfg), devices.prepare(draft_params, draft_cfg)
    models = dict(tcfg=cfg, dcfg=draft_cfg, gamma=gamma, pad_id=req.pad_id)
    t0 = time.perf_counter()
    state, compile_s = _start_program(
        dict(models, buffer_len=req.buffer_len, num_alternatives=logprobs or 0, spec=spec),
        tparams=tparams, dparams=dparams, prompt=jax.device_put(tokens), prompt_pos=jax.device_put(positions),
        sp=req.sampling, stops=req.stops, auto=req.automaton, constraint=req.row_states,
    )
    timing["compile_s"] = compile_s
    while True:
        state, compile_s = _blocks_program(
            dict(models, chunk=chunk), tparams=tparams, dparams=dparams, state=state, sp=req.sampling, stops=req.stops,
            auto=req.automaton,
        )
        done = not bool(jax.device_get(jnp.any(state.out.finish == RUNNING)))
        timing["compile_s"] += compile_s
        timing["decode_s"] = time.perf_counter() - t0 - timing["compile_s"]
        yield state
        if done:
            return


def _generate(params, cfg, draft_params, draft_cfg, request, tokenizer, *, stream: bool):
    gamma = request.value("num_speculative_tokens")
    req = prepare(request, cfg, tokenizer, SPECULATIVE)
    _check(cfg, draft_cfg, gamma, req.spec, req, request.max_new_tokens)
    text = TextStream(tokenizer, req.prompts, req.stop_strings, request.include_stop_str_in_output) if stream else None
    timing: dict = {}
    for state in _run(params, cfg, draft_params, draft_cfg, req, gamma=gamma, chunk=request.chunk,
                      logprobs=request.logprobs, spec=req.spec, timing=timing):
        if stream:
            yield from text.pieces(state.out)
    blocks, proposed, accepted = (int(x) for x in jax.device_get((state.block, state.proposed, state.accepted)))
    result = collect(state.out, req, tokenizer, timing)
    generated = sum(map(len, result.token_ids))
    timing.update(
        acceptance_rate=accepted / proposed if proposed else 1.0,
        tokens_per_block=(generated - len(result.token_ids)) / blocks / len(result.token_ids) if blocks else 0.0,
    )
    yield (-1, result) if stream else result


def speculative_generate(
    params, cfg: ModelConfig, draft_params, draft_cfg: ModelConfig, request, *, tokenizer: Tokenizer | None = None,
    **options,
) -> GenerationResult:
    """Like `generate`, with a draft model proposing `num_speculative_tokens` tokens per target forward.

    `request`: a `request.Request`, or its prompts with the other fields as keyword `options`, as in
    `generate`; the draft is `draft_params, draft_cfg` (it must share the target's vocabulary).
    Greedy rows: the target's own output, token for token. Sampled rows: each token follows the
    target's processed distribution (not the target alone's draws), and a row's output depends
    only on its prompt, settings and seed, not on its batch mates. `logprobs`,
    `num_return_sequences`, stops, `constraint` (draft and target see the same masks) and the
    cache options (`window`, `sinks`, `prefill_chunk`, `kv_cache_dtype`, applied to both models)
    work as in `generate`. `result.timing` adds `acceptance_rate` (drafted tokens the rule
    accepted) and `tokens_per_block` (tokens kept per target forward).
    """
    request = make_request(request, dict(options, draft=Draft(draft_params, draft_cfg)))
    if request.stream:
        raise RequestError("{stream} needs speculative_generate_stream (speculative_generate returns only the finished result)")
    *_, result = _generate(params, cfg, draft_params, draft_cfg, request, tokenizer, stream=False)
    return result


def speculative_generate_stream(
    params, cfg: ModelConfig, draft_params, draft_cfg: ModelConfig, request, *, tokenizer: Tokenizer, **options,
) -> Iterator[tuple[int, object]]:
    """`speculative_generate` as `generate_stream` streams: `(row, text)` pieces after each chunk of
    blocks (each row's pieces concatenate to its text), then `(-1, result)`."""
    request = make_request(request, dict(options, draft=Draft(draft_params, draft_cfg)))
    yield from _generate(params, cfg, draft_params, draft_cfg, request, tokenizer, stream=True)
