"""Beam search: width 1 is greedy, toy Markov chains against a numpy reference and brute force,
ragged batches, and transformers' generate(num_beams=K) when installed."""

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


def markov_search(logits, start, K, max_new, lp, early, B=1):
    """Runs beam_search on a Markov chain: the next token's logits depend only on the last token."""
    V = logits.shape[0]
    R = B * K
    table = jnp.asarray(logits)
    step = lambda tokens, aux: (table[tokens], aux)
    reorder = lambda aux, rows: aux
    history = init_history(jnp.full((R, 1), start, jnp.int32), jnp.ones((R, 1), bool), max_new, V)
    sp = SamplingParams.make(R, V, temperature=0.0, seed=0)
    stops = StopParams.make(R, max_new, eos_ids=[EOS])
    beams = jax.jit(beam_search, static_argnames=("step", "reorder", "num_beams", "early_stopping"))(
        step, reorder, table[jnp.full((R,), start)], None, history, sp, stops, num_beams=K, length_penalty=lp, early_stopping=early
    )
    out = []
    for k in range(K):
        if bool(beams.bank_full[0, k]):
            out.append((tuple(np.asarray(beams.bank_tokens[0, k, : int(beams.bank_len[0, k])]).tolist()), float(beams.bank_scores[0, k])))
    return out


def np_beam_search(logits, start, K, max_new, lp, early):
    """Reference: transformers' beam search semantics written as plain loops (float32 like the device)."""
    logp = np.asarray(jax.nn.log_softmax(jnp.asarray(logits), axis=-1))
    V = logp.shape[0]
    M = 2 * K
    f32 = np.float32
    run = [((), f32(0.0) if k == 0 else f32(NEG)) for k in range(K)]
    bank = [(f32(NEG), (), False)] * K
    open_ = True
    for g in range(max_new):
        cands = [(f32(sc + logp[seq[-1] if seq else start, v]), k * V + v, k, v) for k, (seq, sc) in enumerate(run) for v in range(V)]
        top = sorted(cands, key=lambda c: (-c[0], c[1]))[:M]
        hits = [c[3] == EOS or g + 1 >= max_new for c in top]
        run_scores = [f32(c[0] + (NEG if h else 0)) for c, h in zip(top, hits)]
        keep = sorted(range(M), key=lambda i: (-run_scores[i], i))[:K]
        new_run = [(run[top[i][2]][0] + (top[i][3],), run_scores[i]) for i in keep]
        full = all(f for *_, f in bank)
        fresh = []
        for i, (c, h) in enumerate(zip(top, hits)):
            blocked = (not open_) or not (h and i < K) or (early is True and full)
            s = f32(c[0] / f32(g + 1) ** f32(lp))
            fresh.append((f32(s + NEG) if blocked else s, run[c[2]][0] + (c[3],), not blocked))
        merged = bank + fresh
        bank = [merged[i] for i in sorted(range(len(merged)), key=lambda i: (-merged[i][0], i))[:K]]
        best_len = max_new if (early == "never" and lp > 0) else g + 1
        best = new_run[0][1] / f32(best_len) ** f32(lp)
        worst = min(b[0] for b in bank)
        open_ = open_ and any(best > (worst if f else NEG) for *_, f in bank)
        run = new_run
        if not open_ or all(hits) or (early is True and all(f for *_, f in bank)):
            break
    return [(seq, float(s)) for s, seq, f in bank if f]


def brute_force_best(logits, start, max_new):
    """The best finished sequence by summed log-probability (length_penalty 0), over all of them."""
    logp = np.asarray(jax.nn.log_softmax(jnp.asarray(logits), axis=-1), np.float64)
    best = (-np.inf, None)
    for n in range(1, max_new + 1):
        for seq in itertools.product(range(logp.shape[0]), repeat=n):
            if EOS in seq[:-1] or (n < max_new and seq[-1] != EOS):
                continue
            prev = (start,) + seq[:-1]
            best = max(best, (sum(logp[a, b] for a, b in zip(prev, seq)), seq))
    return best


def markov_table(seed, V=5, scale=2.0):
    return np.random.default_rng(seed).normal(size=(V, V)).astype(np.float32) * scale


@pytest.mark.parametrize("early", [True, False, "never"])
@pytest.mark.parametrize("seed,lp", [(0, 1.0), (1, 0.0), (2, 2.0), (3, -0.5)])
def test_markov_chain_matches_the_reference_beam_search(early, seed, lp):
    table = markov_table(seed)
    got = markov_search(table, 1, K=3, max_new=5, lp=lp, early=early)
    want = np_beam_search(table, 1, K=3, max_new=5, lp=lp, early=early)
    assert [s for s, _ in got] == [s for s, _ in want]
    np.testing.assert_allclose([x for _, x in got], [x for _, x in want], rtol=1e-5)


@pytest.mark.parametrize("early", [False, "never"])
@pytest.mark.parametrize("seed", range(4))
def test_wide_beams_find_the_brute_force_optimum(early, seed):
    V, max_new = 4, 4
    table = markov_table(10 + seed, V=V)
    score, seq = brute_force_best(table, 1, max_new)
    got = markov_search(table, 1, K=(V - 1) ** (max_new - 1), max_new=max_new, lp=0.0, early=early)
    assert got[0][0] == seq
    assert got[0][1] == pytest.approx(score, abs=1e-4)


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
