"""Beam search, written for one example's K beams and vectorized over the batch with `jax.vmap`.

Legend: B batch, K beams, R = B * K model rows, M = max(2, 1 + #EOS) * K candidates,
N output buffer, V vocab.

Semantics follow transformers' beam search (so results can be checked against it):

    per step, for each example:
      log_softmax(logits) → processors (penalties, bans, min_new_tokens) on each beam's own history
      + the beam's running score → the best M continuations over all K × V
      a continuation ending in EOS (or a stop string, or the length limit) that ranks among the
        best K goes to the example's bank with score  sum log-prob / generated_len ** length_penalty
      the best K continuations that did not finish become the running beams
    stop when the bank cannot improve: early_stopping True = K hypotheses finished;
    False = the best running beam, scored at the current length, cannot beat the bank's worst;
    "never" = the same at the longest possible length when length_penalty > 0.

The model is only seen through `step(tokens, aux) -> (logits, aux)` and `reorder(aux, rows)`,
so the same search serves any model (tests use Markov-chain tables). The bookkeeping is a
per-example function mapped with `vmap`; the model runs on all R rows at one cache cursor,
and the cache follows the beams by a gather along the row axis (no per-row scatter).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxllm import devices, kvcache
from jaxllm.compilation import Compiled
from jaxllm.config import ModelConfig
from jaxllm.generate import GenerationResult, bucket, init_state, left_pad, take_rows
from jaxllm.model import forward
from jaxllm.request import BEAM, prepare
from jaxllm.request import make as make_request
from jaxllm.results import decode_rows
from jaxllm.sampling import History, SamplingParams, process_logits, record
from jaxllm.stopping import FINISH_REASONS, RUNNING, StopParams, check_stops
from jaxllm.structured import constraints
from jaxllm.tokenizer import Tokenizer

EARLY_STOPPING = (True, False, "never")
NEG = -1.0e9  # HF's "impossible" score: finite, so sums and comparisons stay well defined


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["scores", "bank_tokens", "bank_len", "bank_scores", "bank_full", "bank_finish", "open", "gen_len"],
    meta_fields=[],
)
@dataclasses.dataclass(frozen=True)
class Beams:
    """Per-example search state (leading axis B outside vmap)."""

    scores: jax.Array  # [B, K] running beams' summed log-probs (beam k > 0 starts at NEG)
    bank_tokens: jax.Array  # [B, K, N] finished hypotheses' tokens, best first
    bank_len: jax.Array  # [B, K] their lengths
    bank_scores: jax.Array  # [B, K] their length-normalized scores (NEG = empty slot)
    bank_full: jax.Array  # [B, K] slot holds a finished hypothesis
    bank_finish: jax.Array  # [B, K] i32 its finish code (stopping.FINISH_REASONS)
    open: jax.Array  # [B] the bank may still improve (HF's "early stop heuristic unsatisfied")
    gen_len: jax.Array  # [] tokens generated so far (shared)


def _select(
    logp: jax.Array, beams: Beams, outputs: jax.Array, windows: jax.Array, filled: jax.Array,
    stops: StopParams, max_new: jax.Array, length_penalty: jax.Array, early_stopping,
):
    """One example's step. logp: [K, V] processed log-probs; outputs: [K, N] running beams' tokens;
    windows/filled: [K, W] / [K] their stop-string byte windows.

    -> (parent [K], token [K], the new Beams, new windows [K, W], filled [K])
    """
    K, V = logp.shape
    M = max(2, 1 + stops.eos_ids.shape[0]) * K
    g = beams.gen_len  # tokens generated before this step
    acc = (logp + beams.scores[:, None]).reshape(-1)
    cand_scores, flat = jax.lax.top_k(acc, M)
    parent, token = flat // V, flat % V

    # each candidate's finish code, by the rule every decoder uses (stopping.check_stops); beam
    # search takes no repeat_count (refused at its boundary), so the repetition check sees nothing
    example = dataclasses.replace(stops, max_new_tokens=max_new, repeat_count=jnp.zeros((), jnp.int32))
    nothing = (jnp.zeros((M, 1), jnp.int32), jnp.zeros((M, 1), bool))
    code, cand_windows, cand_filled = check_stops(
        token, jnp.ones((M,), bool), g, nothing, windows[parent], filled[parent], example, jnp.zeros((M,), bool)
    )
    hits = code != RUNNING

    # the next running beams: the best K continuations that did not finish
    running = jax.lax.top_k(cand_scores + hits * NEG, K)[1]
    new_scores = (cand_scores + hits * NEG)[running]

    # the bank: merge the finished continuations among the best K with the old hypotheses
    cand_tokens = outputs[parent].at[:, g].set(token)  # [M, N]
    normalized = cand_scores / (g + 1.0) ** length_penalty
    blocked = ~beams.open | ~(hits & (jnp.arange(M) < K))
    if early_stopping is True:
        blocked = blocked | jnp.all(beams.bank_full)
    normalized = jnp.where(blocked, normalized + NEG, normalized)
    merged_scores = jnp.concatenate([beams.bank_scores, normalized])
    best = jax.lax.top_k(merged_scores, K)[1]
    bank_tokens = jnp.concatenate([beams.bank_tokens, cand_tokens])[best]
    bank_len = jnp.concatenate([beams.bank_len, jnp.full((M,), g + 1, jnp.int32)])[best]
    bank_full = jnp.concatenate([beams.bank_full, ~blocked])[best]
    bank_finish = jnp.concatenate([beams.bank_finish, code])[best]
    bank_scores = merged_scores[best]

    # can the bank still improve? (HF's heuristic: the best running beam at its best length)
    if early_stopping == "never":
        best_len = jnp.where(length_penalty > 0, max_new, g + 1)
    else:
        best_len = g + 1
    best_possible = new_scores[0] / best_len.astype(jnp.float32) ** length_penalty
    worst = jnp.where(bank_full, jnp.min(bank_scores), NEG)
    still_open = beams.open & jnp.any(best_possible > worst)
    new = Beams(new_scores, bank_tokens, bank_len, bank_scores, bank_full, bank_finish, still_open, g + 1)
    return parent[running], token[running], new, cand_windows[running], cand_filled[running], jnp.all(hits)


def searching(beams: Beams, stuck: jax.Array, early_stopping) -> jax.Array:
    """[B]: is the example still searching?"""
    going = beams.open & ~stuck
    if early_stopping is True:
        going = going & ~jnp.all(beams.bank_full, axis=-1)
    return going


def beam_search(
    step: Callable[[jax.Array, Any], tuple[jax.Array, Any]],
    reorder: Callable[[Any, jax.Array], Any],
    first_logits: jax.Array,
    aux: Any,
    history: History,
    sp: SamplingParams,
    stops: StopParams,
    *,
    num_beams: int,
    length_penalty: float | jax.Array = 1.0,
    early_stopping: bool | str = False,
    automaton: constraints.Automaton | None = None,
    constraint: constraints.RowState | None = None,
) -> Beams:
    """Runs the search to the end; returns the final `Beams` (bank sorted best first).

    first_logits: [R, V] logits after the prompt, already repeated for the K beams of each
    example; aux: the model's state (its KV cache), with rows in the same order; history,
    sp: R rows (each beam's penalties see its own tokens); stops: max_new_tokens per row.
    `step(tokens [R], aux) -> (logits [R, V], aux)` feeds one token per row;
    `reorder(aux, rows [R]) -> aux` makes row r a copy of row rows[r].
    automaton, constraint: each beam follows its row's constraint (`constraints.build`);
    forbidden tokens get the impossible score, like any other processor's ban.
    """
    if early_stopping not in EARLY_STOPPING:
        raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    R, V = first_logits.shape
    K = num_beams
    B = R // K
    N = history.tokens.shape[1] - history.prompt_len
    max_new = stops.max_new_tokens.reshape(B, K)[:, 0]
    lp = jnp.asarray(length_penalty, jnp.float32)
    beams = Beams(
        scores=jnp.tile(jnp.where(jnp.arange(K) == 0, 0.0, NEG), (B, 1)),
        bank_tokens=jnp.zeros((B, K, N), jnp.int32),
        bank_len=jnp.zeros((B, K), jnp.int32),
        bank_scores=jnp.full((B, K), NEG),
        bank_full=jnp.zeros((B, K), bool),
        bank_finish=jnp.zeros((B, K), jnp.int32),
        open=jnp.ones((B,), bool),
        gen_len=jnp.zeros((), jnp.int32),
    )
    W = stops.window
    carry = (
        first_logits, aux, history, beams, jnp.zeros((R, W), jnp.uint8), jnp.zeros((R,), jnp.int32), jnp.zeros((B,), bool),
        constraint,
    )
    per_example = Beams(0, 0, 0, 0, 0, 0, 0, None)  # gen_len is shared
    select = jax.vmap(
        functools.partial(_select, early_stopping=early_stopping),
        in_axes=(0, per_example, 0, 0, 0, None, 0, None),
        out_axes=(0, 0, per_example, 0, 0, 0),
    )

    def cond(carry):
        *_, beams, _, _, stuck, _ = carry
        return jnp.any(searching(beams, stuck, early_stopping)) & (beams.gen_len < N)

    def body(carry):
        logits, aux, history, beams, windows, filled, _, rows_state = carry
        logp = process_logits(jax.nn.log_softmax(logits, axis=-1), sp, history, stops.eos_ids)
        if automaton is not None:
            budget = jnp.repeat(max_new, K) - beams.gen_len - 1
            ok, outcome = constraints.mask(automaton, rows_state, stops.eos_ids, budget)
            logp = jnp.where(ok, logp, NEG)
        outputs = history.tokens[:, history.prompt_len :]
        parent, token, beams, windows, filled, stuck = select(
            logp.reshape(B, K, V), beams, outputs.reshape(B, K, N), windows.reshape(B, K, W), filled.reshape(B, K),
            stops, max_new, lp,
        )
        rows = (jnp.arange(B)[:, None] * K + parent).reshape(R)
        token = token.reshape(R)
        history = dataclasses.replace(
            history, tokens=history.tokens[rows], valid=history.valid[rows], seen=history.seen[rows], counts=history.counts[rows]
        )
        history = record(history, token, jnp.ones((R,), bool))
        if automaton is not None:  # each new beam continues its parent's automaton state
            parent_of = lambda tree: jax.tree_util.tree_map(lambda x: x[rows], tree)
            rows_state = constraints.advance(
                automaton, parent_of(rows_state), parent_of(outcome), token, jnp.ones((R,), bool)
            )
        logits, aux = step(token, reorder(aux, rows))
        return logits, aux, history, beams, windows.reshape(R, W), filled.reshape(R), stuck, rows_state

    return jax.lax.while_loop(cond, body, carry)[3]


# ---------------------------------------------------------------------------- with a jaxllm model


def _beam_program(
    params, prompt, prompt_pos, sp, stops, length_penalty, automaton=None, constraint=None,
    *, cfg, num_beams, buffer_len, early_stopping, spec,
):
    """Prefill the B prompts once (`generate.init_state`: the cache `spec` asks for), repeat each
    example's row for its K beams, search. -> final Beams."""
    B = prompt.shape[0]
    state = init_state(params, cfg, prompt, prompt_pos, stops, buffer_len=buffer_len, spec=spec)
    state = take_rows(state, jnp.repeat(jnp.arange(B), num_beams))

    def step(tokens, aux):
        cache, pos = aux
        logits, cache = forward(params, cfg, tokens[:, None], pos[:, None], cache)
        return logits[:, 0], (cache, pos + 1)

    def reorder(aux, rows):
        cache, pos = aux
        return kvcache.take_rows(cache, rows), pos[rows]

    return beam_search(step, reorder, state.logits, (state.cache, state.next_pos), state.history, sp, stops,
                       num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping,
                       automaton=automaton, constraint=constraint)


_beam_compiled = Compiled(_beam_program)


def beam_generate(params, cfg: ModelConfig, request, *, tokenizer: Tokenizer | None = None, **options) -> GenerationResult:
    """Beam search over a batch of prompts; the n best finished hypotheses of each, best first.

    `request`: a `request.Request`, or its prompts with the other fields as keyword `options`, as in
    `generate` (`num_beams`, `length_penalty`, `early_stopping`, `num_return_sequences` <= num_beams;
    the processors repetition_penalty, no_repeat_ngram_size, min_new_tokens, logit_bias,
    allowed_token_ids, bad_words / bad_words_ids apply to each beam's own history; sampling
    controls are refused: the search is deterministic).
    The result's `scores` are the length-normalized scores (sum log-prob / len ** length_penalty).
    `constraint` (one, or one per prompt) is followed by every beam, as in `generate`.
    `window`, `sinks`, `prefill_chunk` and `kv_cache_dtype` lay out the cache as in `generate`
    (each beam carries its own rows of it).
    """
    request = make_request(request, options)
    req = prepare(request, cfg, tokenizer, BEAM)
    num_beams, num_return_sequences = request.num_beams, request.num_return_sequences
    length_penalty, early_stopping = request.value("length_penalty"), request.value("early_stopping")
    include_stop_str_in_output = request.include_stop_str_in_output
    spec = req.spec
    unique = req.prompts[::num_beams]
    tokens, positions = left_pad(unique, bucket(max(map(len, unique))), req.pad_id)
    t0 = time.perf_counter()
    beams, compile_s = _beam_compiled(
        dict(cfg=cfg, num_beams=num_beams, buffer_len=req.buffer_len, early_stopping=early_stopping, spec=spec),
        params=devices.prepare(params, cfg), prompt=jnp.asarray(tokens), prompt_pos=jnp.asarray(positions),
        sp=req.sampling, stops=req.stops, length_penalty=jnp.asarray(length_penalty, jnp.float32),
        automaton=req.automaton, constraint=req.row_states,
    )
    out, lengths, scores, finish = jax.device_get((beams.bank_tokens, beams.bank_len, beams.bank_scores, beams.bank_finish))
    elapsed = time.perf_counter() - t0 - compile_s
    token_ids, reasons, best, rows_prompt = [], [], [], []
    for b in range(len(unique)):
        for k in range(num_return_sequences):
            token_ids.append(out[b, k, : lengths[b, k]].tolist())
            reasons.append(FINISH_REASONS[finish[b, k]])  # decided on device, when the hypothesis was banked
            best.append(float(scores[b, k]))
            rows_prompt.append(unique[b])
    texts = valid = errors = None
    if tokenizer is not None:
        texts = decode_rows(tokenizer, rows_prompt, token_ids, reasons, req.stop_strings, include_stop_str_in_output)
    if texts is not None and req.automaton is not None:
        specs = [req.constraints[b * num_beams] for b in range(len(unique)) for _ in range(num_return_sequences)]
        own = decode_rows(tokenizer, rows_prompt, token_ids, reasons, req.stop_strings, include_stop_str_in_output, after_prompt=False)
        valid, errors = constraints.verify_all(specs, own)  # as in results.collect
    return GenerationResult(
        token_ids=token_ids,
        finish_reasons=reasons,
        valid=valid,
        errors=errors,
        num_prompt_tokens=[len(unique[b]) for b in range(len(unique)) for _ in range(num_return_sequences)],
        prompt_index=[b for b in range(len(unique)) for _ in range(num_return_sequences)],
        texts=texts,
        scores=best,
        timing={"compile_s": compile_s, "search_s": elapsed},
    )
