"""Beam search: width 1 is greedy, toy Markov chains against brute force (stop strings included),
ragged batches, and transformers' generate(num_beams=K)."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import GenerationError, SamplingParams, StopParams, generate
from jaxllm.beam import NEG, beam_generate, beam_search
from jaxllm.sampling import init_history
from conftest import reference_stack

PROMPTS = [[1, 40, 41, 42], [1, 50, 51, 52, 53, 54, 55, 56, 57, 58], [1, 60]]
EOS = 0


def markov_step(tokens, table):
    """The model of a Markov chain: the next token's logits depend only on the last token."""
    return table[tokens], table


_search = jax.jit(beam_search, static_argnames=("step", "reorder", "num_beams", "early_stopping"))


def markov_search(logits, start, K, max_new, lp, early, stop=(), token_bytes=None):
    """Runs beam_search on a Markov chain -> the bank: [(tokens, score)], best first."""
    V = logits.shape[0]
    table = jnp.asarray(logits)
    history = init_history(jnp.full((K, 1), start, jnp.int32), jnp.ones((K, 1), bool), max_new, V)
    sp = SamplingParams.make(K, V, temperature=0.0, seed=0)
    stops = StopParams.make(K, max_new, eos_ids=[EOS], stop=stop, token_bytes=token_bytes)
    beams = _search(markov_step, lambda aux, rows: aux, table[jnp.full((K,), start)], table, history, sp, stops,
                    num_beams=K, length_penalty=lp, early_stopping=early)
    return [
        (tuple(np.asarray(beams.bank_tokens[0, k, : int(beams.bank_len[0, k])]).tolist()), float(beams.bank_scores[0, k]))
        for k in range(K) if bool(beams.bank_full[0, k])
    ]


def brute_force_ranking(logits, start, max_new, lp, stop=b"", pieces=None):
    """Every finished sequence with its score, sum log-prob / length ** lp, best first (float64).

    A sequence is finished by EOS, by completing the stop string (on the pieces' bytes, across
    token boundaries), or by reaching max_new tokens; whatever finished earlier is not extended.
    """
    logp = np.asarray(jax.nn.log_softmax(jnp.asarray(logits), axis=-1), np.float64)

    def ends_at(seq):  # the index of the token that finishes seq, or None
        text = b""
        for t, tok in enumerate(seq):
            text += pieces[tok] if pieces else b""
            if tok == EOS or (stop and stop in text):
                return t
        return None

    ranking = []
    for n in range(1, max_new + 1):
        for seq in itertools.product(range(logp.shape[0]), repeat=n):
            end = ends_at(seq)
            if end == n - 1 or (end is None and n == max_new):
                prev = (start,) + seq[:-1]
                ranking.append((sum(logp[a, b] for a, b in zip(prev, seq)) / n**lp, seq))
    return [(seq, score) for score, seq in sorted(ranking, reverse=True)]


def markov_table(seed, V=5, scale=2.0):
    return np.random.default_rng(seed).normal(size=(V, V)).astype(np.float32) * scale


def assert_same_ranking(got, want):
    """Same sequences, each with its score, best first (a Markov chain's scores tie exactly when two
    sequences take the same transitions in another order, so tied sequences may come in any order)."""
    assert sorted(seq for seq, _ in got) == sorted(seq for seq, _ in want)
    score = dict(want)
    np.testing.assert_allclose([x for _, x in got], [score[seq] for seq, _ in got], rtol=1e-5, atol=1e-5)
    assert all(a >= b - 1e-5 for (_, a), (_, b) in zip(got, got[1:]))


# More beams than there are finished sequences (4 tokens, at most 4 steps: 121), so the search
# is exhaustive whatever its stopping rule, and its bank must be every finished sequence in order.
# The beams left over run on with the impossible score (NEG) and bank junk far below any real score.
WIDE = 128


def real(bank):
    return [(seq, score) for seq, score in bank if score > NEG / 1e3]


@pytest.mark.parametrize("early", [True, False, "never"])
@pytest.mark.parametrize("seed,lp", [(0, 1.0), (1, 0.0), (2, 2.0), (3, -0.5)])
def test_wide_beams_bank_every_finished_sequence_in_brute_force_order(early, seed, lp):
    table = markov_table(10 + seed, V=4)
    got = real(markov_search(table, 1, K=WIDE, max_new=4, lp=lp, early=early))
    assert_same_ranking(got, brute_force_ranking(table, 1, 4, lp))


@pytest.mark.parametrize("early", [False, "never"])
@pytest.mark.parametrize("seed", range(4))
def test_beams_narrower_than_the_tree_still_find_the_optimum(early, seed):
    # 27 beams against up to 108 continuations a step: pruning happens, yet on these tables the
    # best finished sequence (length_penalty 0: the most probable) survives it
    table = markov_table(10 + seed, V=4)
    got = markov_search(table, 1, K=27, max_new=4, lp=0.0, early=early)
    seq, score = brute_force_ranking(table, 1, 4, 0.0)[0]
    assert got[0][0] == seq and got[0][1] == pytest.approx(score, abs=1e-4)


PIECES = [b"", b"a", b"b", b"ab"]  # token 0 is EOS (no bytes); "ab" completes "ba" after "b"


def piece_bytes():
    lengths = np.array([len(p) for p in PIECES], np.int32)
    table = np.zeros((len(PIECES), 2), np.uint8)
    for i, p in enumerate(PIECES):
        table[i, : len(p)] = list(p)
    return table, lengths


@pytest.mark.parametrize("seed,lp", [(0, 0.0), (1, 1.0), (2, -0.5)])
def test_a_stop_string_finishes_a_hypothesis_like_eos(seed, lp):
    table = markov_table(20 + seed, V=4)
    table[:, EOS] -= 4.0  # rarely EOS: most hypotheses end at the stop string or the length limit
    got = real(markov_search(table, 1, K=WIDE, max_new=4, lp=lp, early=False, stop=["ba"], token_bytes=piece_bytes()))
    want = brute_force_ranking(table, 1, 4, lp, stop=b"ba", pieces=PIECES)
    assert_same_ranking(got, want)
    stopped = [seq for seq, _ in want if len(seq) < 4 and seq[-1] != EOS]
    assert stopped and any(PIECES[a][-1:] == b"b" and PIECES[b][:1] == b"a" for a, b in [s[-2:] for s in stopped if len(s) > 1])


def test_width_one_is_greedy(cfg, params):
    greedy = generate(params, cfg, PROMPTS, max_new_tokens=12, temperature=0.0, eos_token_id=[])
    beam = beam_generate(params, cfg, PROMPTS, num_beams=1, max_new_tokens=12, eos_token_id=[])
    assert beam.token_ids == greedy.token_ids


def test_ragged_batch_equals_each_prompt_alone(cfg, params):
    kw = dict(num_beams=3, max_new_tokens=10, eos_token_id=[5], num_return_sequences=2, length_penalty=0.7)
    together = beam_generate(params, cfg, PROMPTS, **kw)
    for i, prompt in enumerate(PROMPTS):
        alone = beam_generate(params, cfg, [prompt], **kw)
        assert together.token_ids[2 * i : 2 * i + 2] == alone.token_ids
        np.testing.assert_allclose(together.scores[2 * i : 2 * i + 2], alone.scores, rtol=1e-5)


def test_width_one_with_a_stop_string_is_greedy_with_it(cfg, params, tokenizer):
    prompts = ["def f(x):", "the of"]
    free = generate(params, cfg, prompts, tokenizer=tokenizer, max_new_tokens=16, temperature=0.0, eos_token_id=[])
    kw = dict(tokenizer=tokenizer, max_new_tokens=16, eos_token_id=[], stop=[free.texts[0][6:9]])
    greedy = generate(params, cfg, prompts, temperature=0.0, **kw)
    beam = beam_generate(params, cfg, prompts, num_beams=1, **kw)
    assert greedy.finish_reasons[0] == "stop" and len(greedy.token_ids[0]) < 16  # the stop string did end row 0
    assert beam.token_ids == greedy.token_ids
    assert beam.texts == greedy.texts and beam.finish_reasons == greedy.finish_reasons


def test_processors_apply_to_each_beam(cfg, params):
    out = beam_generate(params, cfg, PROMPTS, num_beams=3, max_new_tokens=12, eos_token_id=[], no_repeat_ngram_size=2, num_return_sequences=3)
    for i, got in enumerate(out.token_ids):
        seq = PROMPTS[out.prompt_index[i]] + got
        bigrams = [tuple(seq[j : j + 2]) for j in range(len(seq) - 1)]
        assert len(bigrams) == len(set(bigrams))


def test_bad_arguments(cfg, params):
    with pytest.raises(GenerationError, match="num_return_sequences"):
        beam_generate(params, cfg, PROMPTS, num_beams=2, num_return_sequences=3)
    with pytest.raises(GenerationError, match="early_stopping"):
        beam_generate(params, cfg, PROMPTS, early_stopping="sometimes")
    with pytest.raises(GenerationError, match="temperature"):
        beam_generate(params, cfg, PROMPTS, temperature=0.5)


@pytest.mark.parametrize("early,lp,n", [(True, 1.0, 2), (False, 1.0, 3), ("never", 2.0, 2), (False, -1.0, 1)])
def test_equals_transformers_beam_search(early, lp, n, tmp_path):
    EOS_ID = 6  # a token the model likes early: hypotheses finish at different lengths
    torch, tf = reference_stack()
    from jaxllm.hf import load_hf

    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.5)
    model = tf.LlamaForCausalLM(config).eval()
    model.save_pretrained(tmp_path)
    params, cfg, _, _ = load_hf(tmp_path)
    prompt = np.random.default_rng(1).integers(3, 64, size=(1, 6))
    with torch.inference_mode():
        hf = model.generate(torch.from_numpy(prompt), attention_mask=torch.ones_like(torch.from_numpy(prompt)), num_beams=4,
                            max_new_tokens=10, early_stopping=early, length_penalty=lp, num_return_sequences=n,
                            eos_token_id=EOS_ID, pad_token_id=0, do_sample=False, output_scores=True, return_dict_in_generate=True)
    ours = beam_generate(params, cfg, prompt.tolist(), num_beams=4, max_new_tokens=10, early_stopping=early,
                         length_penalty=lp, num_return_sequences=n, eos_token_id=[EOS_ID])
    want = [[t for t in seq[6:].tolist()] for seq in hf.sequences]
    want = [w[: w.index(EOS_ID) + 1] if EOS_ID in w else w for w in want]  # HF pads shorter hypotheses
    assert lp > 1 or any(EOS_ID in w for w in want)  # the search did have to handle finished hypotheses
    assert ours.token_ids == want
    np.testing.assert_allclose(ours.scores, hf.sequences_scores.numpy(), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------- the cache options


def np_beam_search(logits_fn, prompt, K, steps):
    """Plain beam search, float64, no EOS: the K best continuations of `steps` tokens by summed
    log-prob, best first. `logits_fn(ids) -> [V]` is the next token's logits after ids."""
    beams = [((), 0.0)]
    for _ in range(steps):
        candidates = []
        for seq, score in beams:
            z = np.asarray(logits_fn(list(prompt) + list(seq)), np.float64)
            logp = z - z.max() - np.log(np.exp(z - z.max()).sum())
            candidates += [(seq + (t,), score + logp[t]) for t in range(len(z))]
        beams = sorted(candidates, key=lambda c: -c[1])[:K]
    return beams


def kept(ids, W, S):
    """The tokens an attention-sinks cache of W slots (S sinks) holds once `ids` are fed."""
    return ids if len(ids) <= W else ids[:S] + ids[len(ids) - (W - S) :]


def one_layer(vocab_size):
    from conftest import tiny_config
    from jaxllm import init_params

    cfg = tiny_config(vocab_size, n_layers=1)
    return jax.tree_util.tree_map(lambda x: x * 5 if x.ndim > 1 else x, init_params(cfg, jax.random.key(3))), cfg


# Each case: the cache options, and the model a cache-free forward over the whole sequence must be
# to give the same logits: a window is a sliding-window model, an int8 cache rounds every key and
# value to int8 steps, and with sinks (one layer, so a key depends on its token alone) the logits
# are a forward over the tokens the cache keeps, at positions 0, 1, ... (StreamingLLM).
CACHE_CASES = {
    "window": (dict(window=8), lambda cfg, ids: dict(cfg=cfg.replace(sliding_window=8), tokens=ids)),
    "int8": (dict(kv_cache_dtype="int8"), lambda cfg, ids: dict(cfg=cfg, tokens=ids, int8_kv=True)),
    "sinks": (dict(window=8, sinks=2), lambda cfg, ids: dict(cfg=cfg, tokens=kept(ids, 8, 2))),
}


@pytest.mark.parametrize("case", CACHE_CASES)
def test_beams_over_a_ring_sinks_or_int8_cache_equal_brute_force_over_full_forwards(case, cfg, params):
    from reference import np_forward

    options, reference = CACHE_CASES[case]
    if case == "sinks":
        params, cfg = one_layer(cfg.vocab_size)
    K, steps, prompts = 3, 10, [PROMPTS[0][:3] + [43, 44], PROMPTS[1]]  # 5 and 10 tokens: both pass the 8-slot ring
    ours = beam_generate(params, cfg, prompts, num_beams=K, num_return_sequences=K, max_new_tokens=steps,
                         eos_token_id=[], length_penalty=0.0, **options)
    assert ours.finish_reasons == ["length"] * (K * len(prompts))
    for i, prompt in enumerate(prompts):
        want = np_beam_search(lambda ids: np_forward(params, **reference(cfg, ids))[-1], prompt, K, steps)
        assert ours.token_ids[K * i : K * (i + 1)] == [list(seq) for seq, _ in want]
        np.testing.assert_allclose(ours.scores[K * i : K * (i + 1)], [s for _, s in want], rtol=1e-3)
    if case != "int8":  # the ring matters: the same search over the plain model finds other beams
        plain = np_beam_search(lambda ids: np_forward(params, cfg, ids)[-1], prompts[1], K, steps)
        assert [list(seq) for seq, _ in plain] != ours.token_ids[K : 2 * K]
