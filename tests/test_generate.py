"""The decode loop: equals a cache-free reference, batches like single prompts, stops, never recompiles."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import GenerationError, SamplingParams, StopParams, generate, generate_tokens
from jaxllm.compilation import CompileCounter
from jaxllm.generate import bucket, left_pad
from jaxllm.sampling import choose_next, init_history
from reference import np_greedy

PROMPTS = [[1, 40, 41, 42], [1, 50, 51, 52, 53, 54, 55, 56, 57, 58], [1, 60]]


def test_greedy_equals_full_forward_reference(cfg, params):
    result = generate(params, cfg, PROMPTS[:2], max_new_tokens=12, temperature=0.0, eos_token_id=[])
    for prompt, got in zip(PROMPTS, result.token_ids):
        assert got == np_greedy(params, cfg, prompt, 12)
    assert result.finish_reasons == ["length", "length"]


def test_batch_of_ragged_prompts_equals_each_prompt_alone(cfg, params):
    together = generate(params, cfg, PROMPTS, max_new_tokens=20, temperature=0.0, eos_token_id=[])
    for prompt, got in zip(PROMPTS, together.token_ids):
        alone = generate(params, cfg, [prompt], max_new_tokens=20, temperature=0.0, eos_token_id=[])
        assert got == alone.token_ids[0]


def test_eos_stops_only_its_row(cfg, params):
    free = generate(params, cfg, PROMPTS[:2], max_new_tokens=16, temperature=0.0, eos_token_id=[]).token_ids
    eos = next(t for t in free[0][3:] if t not in free[1])  # row 0 emits it after a few tokens, row 1 never
    first = free[0].index(eos)
    assert 0 < first < 15
    unused = min(set(range(cfg.vocab_size)) - set(free[0]) - set(free[1]))  # a second EOS id that never comes
    result = generate(params, cfg, PROMPTS[:2], max_new_tokens=16, temperature=0.0, eos_token_id=[eos, unused])
    assert result.token_ids[0] == free[0][: first + 1]  # EOS kept in the ids
    assert result.finish_reasons[0] == "eos"
    assert result.token_ids[1] == free[1] and result.finish_reasons[1] == "length"


def test_max_new_tokens_is_exact_and_does_not_recompile(cfg, params):
    generate(params, cfg, PROMPTS, max_new_tokens=9, temperature=0.0, eos_token_id=[])
    with CompileCounter() as c:
        lengths = [len(t) for n in (5, 13, 16) for t in generate(params, cfg, PROMPTS, max_new_tokens=n, temperature=0.0, eos_token_id=[]).token_ids]
    assert lengths == [5] * 3 + [13] * 3 + [16] * 3
    assert c.count == 0


def test_the_chunk_program_compiled_ahead_from_the_prefill_shapes_is_the_one_that_runs():
    from conftest import tiny_config
    from jaxllm import init_params
    from jaxllm.generate import _chunk_program

    cfg = tiny_config(89)  # shapes no other test compiles
    out = generate(init_params(cfg, jax.random.key(0)), cfg, PROMPTS, max_new_tokens=20, temperature=0.0, eos_token_id=[])
    assert [len(t) for t in out.token_ids] == [20] * 3  # two chunks: the second found the program ready
    programs = [p for key, p in _chunk_program._programs.items() if dict(key[0])["cfg"] == cfg]
    assert len(programs) == 1 and isinstance(programs[0], jax.stages.Compiled)  # compiled once, not again for the real state


def pow2(n):
    return 1 << max(0, n - 1).bit_length()


def program_shapes(rows, longest_prompt, max_new_tokens, stop=()):
    """The README's rule for when generate compiles: what its programs' shapes depend on."""
    stop_bytes = [len(s.encode("utf-8")) for s in stop]
    return (rows, max(16, pow2(longest_prompt)), max(16, pow2(max_new_tokens)),
            pow2(len(stop)) if stop else 0, pow2(max(stop_bytes)) if stop else 0)


def test_a_program_is_compiled_exactly_when_a_bucket_changes(cfg, params, tokenizer):
    # Five rows: a batch size no other test uses, so every program here is compiled here first.
    prompts = [[1, 40 + i] for i in range(5)]
    # max_new_tokens from 1 to 32: two buckets; stop strings: one and four of them, 1 to 4 bytes long
    calls = [dict(max_new_tokens=n) for n in (1, 5, 16, 17, 24, 32)]
    calls += [dict(max_new_tokens=8, stop=s) for s in (
        ["x"], ["\n"], ["\u3053"], ["wxyz"], ["ab", "c", "d"], ["ab", "cd", "e", "f"],
    )]
    seen, compiled, expected = set(), [], []
    for call in calls:
        shapes = program_shapes(len(prompts), 2, call["max_new_tokens"], call.get("stop", ()))
        expected.append(shapes not in seen)
        seen.add(shapes)
        with CompileCounter() as c:
            generate(params, cfg, prompts, tokenizer=tokenizer, temperature=0.0, max_new_tokens=call["max_new_tokens"],
                     stop=call.get("stop", ()))
        compiled.append(c.count > 0)
    assert compiled == expected
    assert sum(expected) == 5  # both kinds of call were made


def test_changing_temperature_or_seed_does_not_recompile(cfg, params):
    generate(params, cfg, PROMPTS, max_new_tokens=8, temperature=0.7, seed=1)
    with CompileCounter() as c:
        generate(params, cfg, PROMPTS, max_new_tokens=8, temperature=1.3, seed=2)
        generate(params, cfg, PROMPTS, max_new_tokens=8, temperature=[0.0, 0.5, 2.0], seed=[3, 4, 5])
    assert c.count == 0


def test_same_seed_same_output_whatever_the_batch(cfg, params):
    kw = dict(max_new_tokens=16, eos_token_id=[], temperature=1.0)
    alone = generate(params, cfg, [PROMPTS[0]], seed=11, **kw).token_ids[0]
    again = generate(params, cfg, [PROMPTS[0]], seed=11, **kw).token_ids[0]
    in_batch = generate(params, cfg, [PROMPTS[1], PROMPTS[0]], seed=[99, 11], temperature=[0.3, 1.0], max_new_tokens=16, eos_token_id=[]).token_ids[1]
    other_seed = generate(params, cfg, [PROMPTS[0]], seed=12, **kw).token_ids[0]
    assert alone == again == in_batch
    assert alone != other_seed


def test_temperature_sampling_matches_the_softmax_distribution():
    # chi-square goodness of fit over many independent rows (one seed each)
    logits = jnp.log(jnp.asarray([0.5, 0.25, 0.15, 0.07, 0.03]))
    n, t = 20000, 0.8
    sampling = SamplingParams.make(n, 5, temperature=t, seed=np.arange(n))
    history = init_history(jnp.ones((n, 1), jnp.int32), jnp.zeros((n, 1), bool), 4, 5)
    no_eos = jnp.zeros((0,), jnp.int32)
    tokens = np.asarray(jax.jit(choose_next)(jnp.broadcast_to(logits, (n, 5)), sampling, history, no_eos)[0])
    expected = np.asarray(jax.nn.softmax(logits / t)) * n
    chi2 = (((np.bincount(tokens, minlength=5) - expected) ** 2) / expected).sum()
    assert chi2 < 18.5  # p = 0.001 for 4 degrees of freedom
    greedy = SamplingParams.make(n, 5, temperature=0.0, seed=0)
    assert np.all(np.asarray(choose_next(jnp.broadcast_to(logits, (n, 5)), greedy, history, no_eos)[0]) == 0)


def test_without_a_seed_identical_rows_are_independent_draws_from_the_softmax():
    # seed=None draws a seed per row: identical rows (two identical prompts) are independent
    # samples, so their tokens follow the softmax; with one seed for all they would all be equal
    logits = jnp.log(jnp.asarray([0.5, 0.25, 0.15, 0.07, 0.03]))
    n = 4000
    sampling = SamplingParams.make(n, 5, temperature=1.0, seed=None)
    history = init_history(jnp.ones((n, 1), jnp.int32), jnp.zeros((n, 1), bool), 4, 5)
    tokens = np.asarray(jax.jit(choose_next)(jnp.broadcast_to(logits, (n, 5)), sampling, history, jnp.zeros((0,), jnp.int32))[0])
    expected = np.asarray(jax.nn.softmax(logits)) * n
    chi2 = (((np.bincount(tokens, minlength=5) - expected) ** 2) / expected).sum()
    assert chi2 < 18.5  # p = 0.001 for 4 degrees of freedom


def test_generate_tokens_composes_with_user_jit(cfg, params):
    tokens, positions = left_pad(PROMPTS, 16, pad_id=0)
    sampling = SamplingParams.make(3, cfg.vocab_size, temperature=0.0, seed=0)
    stops = StopParams.make(3, max_new_tokens=10)

    @jax.jit
    def user_fn(params, tokens, positions):
        state = generate_tokens(params, cfg, tokens, positions, sampling, stops, buffer_len=16, chunk=8)
        return state.tokens, state.length

    out, length = user_fn(params, jnp.asarray(tokens), jnp.asarray(positions))
    want = generate(params, cfg, PROMPTS, max_new_tokens=10, temperature=0.0, eos_token_id=[]).token_ids
    assert [np.asarray(out)[r, : int(length[r])].tolist() for r in range(3)] == want


def test_text_prompts_with_tokenizer(cfg, params, tokenizer):
    result = generate(params, cfg, ["def f(x):", "こんにちは"], tokenizer=tokenizer, max_new_tokens=6, temperature=0.0)
    ids = [tokenizer.encode(p, add_bos=True) for p in ["def f(x):", "こんにちは"]]
    assert result.num_prompt_tokens == [len(i) for i in ids]
    by_ids = generate(params, cfg, ids, max_new_tokens=6, temperature=0.0, eos_token_id=tokenizer.eos_id)
    assert result.token_ids == by_ids.token_ids
    assert result.texts == [tokenizer.decode(t) for t in by_ids.token_ids]


def test_bad_requests_raise_clear_errors(cfg, params):
    with pytest.raises(GenerationError, match="context"):
        generate(params, cfg, [[1] * 100], max_new_tokens=cfg.max_seq_len - 50)
    with pytest.raises(GenerationError, match="temperature"):
        generate(params, cfg, PROMPTS, temperature=-1.0)
    with pytest.raises(GenerationError, match="max_new_tokens"):
        generate(params, cfg, PROMPTS, max_new_tokens=0)
    with pytest.raises(GenerationError, match="empty"):
        generate(params, cfg, [[]])
    with pytest.raises(GenerationError, match="tokenizer"):
        generate(params, cfg, ["text"])
    with pytest.raises(GenerationError, match="eos_token_id .* is outside the vocabulary"):  # was an OverflowError
        generate(params, cfg, PROMPTS, eos_token_id=[2, 2**63])
    with pytest.raises(GenerationError, match="max_new_tokens"):  # a ring cache never fills: was an OverflowError
        generate(params, cfg, PROMPTS, max_new_tokens=2**31, window=16)


def test_buckets_are_powers_of_two():
    assert [bucket(n) for n in (1, 16, 17, 100, 128, 129)] == [16, 16, 32, 128, 128, 256]
