"""Speculative decoding: a small draft model proposes γ tokens, the target checks them in one forward.

Legend: B batch, G = γ drafted tokens per block, V vocab.

One block, all inside one jit-compiled `lax.while_loop` (no host round trip per block):

    draft:  feed the last token, then its own proposals: x_1..x_G ~ q (G + 1 draft forwards,
            the last only to keep the draft cache complete)
    target: one forward over [last, x_1..x_G] -> p_0..p_G
    accept: x_i with probability min(1, p(x_i) / q(x_i)); at the first rejection draw from
            normalize(max(0, p - q)); if all G are accepted, draw a bonus token from p_G
    both caches roll back by moving their shared cursor

p and q are the *processed* distributions: the whole sampling chain of sampling.py applied
to both, with history-dependent processors seeing the drafted tokens. Greedy rows use
one-hot distributions, so acceptance means "the draft's token is the target's argmax" and
the output equals the target's own greedy output token for token.

Rows accept different numbers of tokens, but both caches are written at one cursor shared by
all rows. The batch advances by n + 1 tokens where n is the smallest count any running row
accepted: each row keeps its first n accepted tokens and its own (n+1)-th token (its accepted
draft, its residual draw, or the bonus). Every row's output is still an exact sample from the
target, since a prefix of speculative output is itself exact; the cost is the work a row's
extra accepted tokens did, so speedups shrink as batches grow. (It also means a sampled row's
tokens depend on its batch mates, unlike `generate`; greedy rows do not.)
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp

from jaxllm import constraints, devices
from jaxllm.compilation import Compiled
from jaxllm.config import ModelConfig
from jaxllm.errors import GenerationError
from jaxllm.generate import DecodeState, GenerationResult, bucket, emit, left_pad
from jaxllm.request import SPECULATIVE, Draft, prepare
from jaxllm.request import make as make_request
from jaxllm.kvcache import KVCache, init_cache
from jaxllm.model import forward, hidden_states, unembed
from jaxllm.results import collect
from jaxllm.sampling import NEG_INF, History, SamplingParams, draw, first_argmax, init_history, process_logits, record, row_keys, warp
from jaxllm.stopping import CONSTRAINT, RUNNING
from jaxllm.tokenizer import Tokenizer


def distribution(
    logits: jax.Array, sp: SamplingParams, history: History, eos_ids: jax.Array, allowed: jax.Array | None = None
) -> jax.Array:
    """The processed next-token distribution [B, V] that `choose_next` samples from (one-hot when greedy).

    `allowed` [B, V]: a constraint's mask, applied first (as in `generate.decode_step`).
    """
    if allowed is not None:
        logits = jnp.where(allowed, logits, NEG_INF)
    z = process_logits(logits, sp, history, eos_ids)
    greedy = (sp.temperature == 0)[:, None]
    return jnp.where(greedy, jax.nn.one_hot(first_argmax(z), z.shape[-1]), jax.nn.softmax(warp(z, sp), axis=-1))


def _keys(sp: SamplingParams, block: jax.Array, salt: int) -> jax.Array:
    """Independent per-row keys for one purpose (salt) in one block."""
    return jax.vmap(lambda k: jax.random.fold_in(k, salt))(row_keys(sp, block))


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["out", "last", "draft_cache", "block", "proposed", "accepted"],
    meta_fields=[],
)
@dataclasses.dataclass(frozen=True)
class SpecState:
    out: DecodeState  # history, stops, logprobs and the target's cache (its `logits` are unused)
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

    # 1. the draft proposes x_1..x_G from q_0..q_{G-1}, seeing its own proposals in the history;
    # with a constraint, the masks (and automaton states) along the drafted path serve the target too
    def draft_step(carry, j):
        cache, token, history, rows = carry
        logits, cache = forward(dparams, dcfg, token[:, None], (pos0 + j)[:, None], cache)
        allowed, outcome = _constrain(auto, rows, stops, out.step + j)
        q = distribution(logits[:, 0], sp, history, stops.eos_ids, allowed)
        x = draw(q, jax.vmap(lambda k: jax.random.fold_in(k, j))(_keys(sp, state.block, 1)))
        after = rows if auto is None else constraints.advance(auto, rows, outcome, x, running)
        return (cache, x, record(history, x, running), after), (x, q, allowed, rows, outcome)

    (dcache, _, _, _), (xs, qs, masks, path, outcomes) = jax.lax.scan(
        draft_step, (state.draft_cache, state.last, out.history, out.constraint), jnp.arange(gamma + 1)
    )
    xs, qs = xs[:gamma].T, jnp.moveaxis(qs[:gamma], 0, 1)  # [B, G], [B, G, V] (the last step only fed x_G)

    # 2. the target scores every position in one forward
    fed = jnp.concatenate([state.last[:, None], xs], axis=1)  # [B, G + 1]
    logits, tcache = forward(tparams, tcfg, fed, pos0[:, None] + jnp.arange(gamma + 1), out.cache)

    def target_dist(history, j):
        p = distribution(logits[:, j], sp, history, stops.eos_ids, None if auto is None else masks[j])
        return record(history, xs[:, jnp.minimum(j, gamma - 1)], running), p

    _, ps = jax.lax.scan(target_dist, out.history, jnp.arange(gamma + 1))
    ps = jnp.moveaxis(ps, 0, 1)  # [B, G + 1, V]

    # 3. accept each x_i with probability min(1, p/q); n = the fewest any running row accepted
    p_x = jnp.take_along_axis(ps[:, :gamma], xs[..., None], axis=2)[..., 0]
    q_x = jnp.take_along_axis(qs, xs[..., None], axis=2)[..., 0]
    u = jax.vmap(lambda k: jax.random.uniform(k, (gamma,)))(_keys(sp, state.block, 2))
    ok = u * q_x < p_x  # u < p/q without dividing by a zero q
    count = jnp.sum(jnp.cumprod(ok, axis=1), axis=1)  # [B] leading accepts
    n = jnp.min(jnp.where(running, count, gamma))

    # 4. each row's (n+1)-th token: its accepted draft, else a residual draw, else (n = G) the bonus
    p_n = ps[:, n]
    q_n = jnp.where(n < gamma, qs[:, jnp.minimum(n, gamma - 1)], 0.0)
    residual = jnp.maximum(p_n - q_n, 0.0)
    residual = jnp.where(jnp.sum(residual, axis=-1, keepdims=True) > 0, residual, p_n)
    drawn = draw(residual, _keys(sp, state.block, 3))
    new = jnp.where(count > n, xs[:, jnp.minimum(n, gamma - 1)], drawn)

    # 5. emit x_1..x_n and the new token, each checked against the stop conditions in order
    tokens = jnp.concatenate([xs, new[:, None]], axis=1).at[jnp.arange(B), n].set(new)  # [B, G + 1]

    def emit_one(out, j):
        if auto is not None:  # a row whose constraint allows nothing here ends
            stuck = (j <= n) & (out.finish == RUNNING) & ~jnp.any(masks[j], axis=-1)
            out = dataclasses.replace(out, finish=jnp.where(stuck, CONSTRAINT, out.finish))
        out = jax.lax.cond(
            (j <= n) & jnp.any(out.finish == RUNNING),  # once every row is done, nothing is recorded
            lambda o: emit(o, tokens[:, j], jnp.log(ps[:, j]), stops, pad_id=pad_id),
            lambda o: o,
            out,
        )
        return out, None

    out, _ = jax.lax.scan(emit_one, dataclasses.replace(out, cache=tcache), jnp.arange(gamma + 1))
    if auto is not None:  # the automaton state after x_1..x_n and the new token
        at_n = lambda tree: jax.tree_util.tree_map(lambda x: x[n], tree)
        out = dataclasses.replace(out, constraint=constraints.advance(auto, at_n(path), at_n(outcomes), new, running))

    # 6. roll both caches back to the n + 1 tokens kept (their stale slots are rewritten next block)
    cursor = state.draft_cache.cursor + n + 1
    out = dataclasses.replace(out, next_pos=pos0 + n + 1, cache=dataclasses.replace(out.cache, cursor=cursor))
    return SpecState(
        out=out,
        last=new,
        draft_cache=dataclasses.replace(dcache, cursor=cursor),
        block=state.block + 1,
        proposed=state.proposed + gamma * jnp.sum(running),
        accepted=state.accepted + jnp.sum(jnp.where(running, count, 0)),
    )


def _speculate(
    tparams, dparams, prompt, prompt_pos, sp, stops, auto=None, constraint=None, *, tcfg, dcfg, gamma, buffer_len, pad_id
) -> SpecState:
    """Prefill both models, draw the first token from the target, then blocks until every row is done."""
    B, P = prompt.shape
    slots = P + buffer_len + gamma + 1  # speculative writes may run G + 1 slots past the last kept token
    th, tcache = hidden_states(tparams, tcfg, prompt, prompt_pos, init_cache(tcfg, B, slots))
    _, dcache = hidden_states(dparams, dcfg, prompt, prompt_pos, init_cache(dcfg, B, slots))
    # room for the G + 1 drafted tokens the draft and target histories look ahead by
    history = init_history(prompt, prompt_pos >= 0, buffer_len + gamma + 1, tcfg.vocab_size)
    out = DecodeState(
        logits=jnp.zeros((B, 1), jnp.float32), history=history, finish=jnp.zeros((B,), jnp.int32),
        next_pos=jnp.max(prompt_pos, axis=1) + 1, window=jnp.zeros((B, stops.window), jnp.uint8),
        filled=jnp.zeros((B,), jnp.int32), logprobs=jnp.zeros((B, buffer_len), jnp.float32),
        top_ids=jnp.zeros((B, buffer_len, 0), jnp.int32), top_logprobs=jnp.zeros((B, buffer_len, 0), jnp.float32),
        cache=tcache, constraint=constraint,
    )
    allowed, outcome = _constrain(auto, constraint, stops, jnp.zeros((B,), jnp.int32))
    p = distribution(unembed(tparams, tcfg, th[:, -1]), sp, history, stops.eos_ids, allowed)
    first = draw(p, _keys(sp, jnp.int32(-1), 0))
    if auto is not None:
        stuck = ~jnp.any(allowed, axis=-1)
        out = dataclasses.replace(out, finish=jnp.where(stuck, CONSTRAINT, out.finish))
        out = dataclasses.replace(out, constraint=constraints.advance(auto, constraint, outcome, first, ~stuck))
    out = emit(out, first, jnp.log(p), stops, pad_id=pad_id)
    zero = jnp.zeros((), jnp.int32)
    state = SpecState(out=out, last=first, draft_cache=dcache, block=zero, proposed=zero, accepted=zero)
    return jax.lax.while_loop(
        lambda s: jnp.any(s.out.finish == RUNNING),
        lambda s: _block(tparams, tcfg, dparams, dcfg, s, sp, stops, auto, gamma=gamma, pad_id=pad_id),
        state,
    )


_speculate_compiled = Compiled(_speculate)


def speculative_generate(
    params, cfg: ModelConfig, draft_params, draft_cfg: ModelConfig, request, *, tokenizer: Tokenizer | None = None,
    **options,
) -> GenerationResult:
    """Like `generate`, with a draft model proposing `num_speculative_tokens` tokens per target forward.

    `request`: a `request.Request`, or its prompts with the other fields as keyword `options`, as in
    `generate`; the draft is `draft_params, draft_cfg` (it must share the target's vocabulary).
    `result.timing` adds `acceptance_rate` (drafted tokens the rule accepted) and
    `tokens_per_block` (tokens kept per target forward).
    `constraint` works as in `generate`: draft and target see the same masks.
    """
    request = make_request(request, dict(options, draft=Draft(draft_params, draft_cfg)))
    gamma = request.value("num_speculative_tokens")
    max_new_tokens = request.max_new_tokens
    if draft_cfg.vocab_size != cfg.vocab_size:
        raise GenerationError(f"the draft's vocab_size ({draft_cfg.vocab_size}) differs from the target's ({cfg.vocab_size})")
    req = prepare(request, cfg, tokenizer, SPECULATIVE)
    longest = max(map(len, req.prompts)) + max_new_tokens
    if longest + gamma + 1 > draft_cfg.max_seq_len:
        raise GenerationError(f"the draft's context ({draft_cfg.max_seq_len}) is too short for {longest} tokens plus {gamma + 1} drafted")
    tokens, positions = left_pad(req.prompts, bucket(max(map(len, req.prompts))), req.pad_id)
    t0 = time.perf_counter()
    state, compile_s = _speculate_compiled(
        dict(tcfg=cfg, dcfg=draft_cfg, gamma=gamma, buffer_len=req.buffer_len, pad_id=req.pad_id),
        tparams=devices.prepare(params, cfg), dparams=devices.prepare(draft_params, draft_cfg), prompt=jnp.asarray(tokens),
        prompt_pos=jnp.asarray(positions), sp=req.sampling, stops=req.stops, auto=req.automaton,
        constraint=req.row_states,
    )
    blocks, proposed, accepted = (int(x) for x in jax.device_get((state.block, state.proposed, state.accepted)))
    elapsed = time.perf_counter() - t0 - compile_s
    timing = {"compile_s": compile_s, "decode_s": elapsed}
    result = collect(state.out, req, tokenizer, timing)
    generated = sum(map(len, result.token_ids))
    timing.update(
        acceptance_rate=accepted / proposed if proposed else 1.0,
        tokens_per_block=(generated - len(result.token_ids)) / blocks / len(result.token_ids) if blocks else 0.0,
    )
    return result
