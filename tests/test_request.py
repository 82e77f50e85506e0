"""The generation request: one validation for the API and the CLI, one rule for per-prompt values,
and sample.py's defaults equal to the API's."""

from __future__ import annotations

import json
import sys

import pytest

from jaxllm import GenerationError, generate, save_checkpoint
from jaxllm.beam import beam_generate
from jaxllm.chat import build_prompt
from jaxllm.request import Request, RequestError, with_model_defaults
from conftest import REPO
from fuzzing import run_cli

sys.path.insert(0, str(REPO))
import sample  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(cfg, params, tokenizer, tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("request") / "ckpt", params, cfg, tokenizer)


@pytest.mark.parametrize("options, both", [
    (dict(length_penalty=2.0), ("length_penalty", "num_beams")),
    (dict(early_stopping=True), ("early_stopping", "num_beams")),
    (dict(num_speculative_tokens=3), ("num_speculative_tokens", "draft")),
    (dict(max_json_depth=4), ("max_json_depth", "json")),
    (dict(retries=2), ("retries", "json")),
    (dict(verify_only=True), ("verify_only", "json")),
    (dict(json=True, regex="a+"), ("json", "regex")),
    (dict(sinks=4, window=4), ("sinks", "window")),
    (dict(num_beams=2, temperature=0.5), ("temperature", "num_beams")),
    (dict(num_beams=2, num_return_sequences=3), ("num_return_sequences", "num_beams")),
    (dict(num_beams=2, logprobs=2), ("logprobs", "num_beams")),
    (dict(num_beams=2, stream=True), ("stream", "num_beams")),
    (dict(draft="d", retries=1, json=True), ("retries", "draft")),
    (dict(stream=True, retries=1, json=True), ("retries", "stream")),
])
def test_the_api_refuses_what_does_not_combine_naming_both_fields(options, both):
    with pytest.raises(RequestError) as e:
        Request("x", **options)
    message = str(e.value)
    assert "\n" not in message and all(name in message for name in both), message
    assert e.value.render(lambda f: f"--{f}").count("--") >= 2  # the CLI shows both as flags


def test_generate_refuses_options_of_another_decoder_and_old_names(params, cfg):
    with pytest.raises(RequestError, match="num_beams > 1 asks for beam search"):
        generate(params, cfg, [[1, 2]], num_beams=2)
    with pytest.raises(RequestError, match="length_penalty applies only with num_beams > 1"):
        generate(params, cfg, [[1, 2]], length_penalty=0.5)
    with pytest.raises(RequestError, match="temperature does not work with num_beams > 1"):
        beam_generate(params, cfg, [[1, 2]], num_beams=1, temperature=0.5)  # beam search, whatever its K
    with pytest.raises(RequestError, match="include_stop_str_in_output applies only with stop"):
        generate(params, cfg, [[1, 2]], include_stop_str_in_output=True)
    with pytest.raises(TypeError, match="repeat_count .now stop_on_repetition"):
        generate(params, cfg, [[1, 2]], repeat_count=3)
    with pytest.raises(TypeError, match="enforce .now verify_only"):
        generate(params, cfg, [[1, 2]], enforce=False)


def test_ranges_are_checked_when_the_request_is_made():
    for options, name in [(dict(temperature=-1.0), "temperature"), (dict(top_p=0.0), "top_p"),
                          (dict(seed=-1), "seed"), (dict(max_new_tokens=0), "max_new_tokens"),
                          (dict(logprobs=21), "logprobs"), (dict(top_k=1.5), "top_k"),
                          (dict(no_repeat_ngram_size=17), "no_repeat_ngram_size"), (dict(stop_on_repetition=1), "stop_on_repetition"),
                          (dict(temperature=[0.5, -1.0]), "temperature"), (dict(temperature=[0.5]), "temperature")]:
        with pytest.raises(GenerationError, match=name):
            Request(["a", "b"], **options)


def test_a_models_own_defaults_fill_only_options_its_mode_takes():
    """generation_config.json's temperature must not make a beam search request invalid."""
    defaults = {"temperature": 0.6, "top_p": 0.9, "max_new_tokens": 20, "repetition_penalty": 1.1}
    beam, taken = with_model_defaults({"num_beams": 2, "max_new_tokens": 8}, defaults)
    assert beam == {"num_beams": 2, "max_new_tokens": 8, "repetition_penalty": 1.1} and taken == ["repetition_penalty"]
    Request("x", **beam)  # valid
    sampled, _ = with_model_defaults({"top_p": 0.5}, defaults)
    assert sampled == {"top_p": 0.5, "temperature": 0.6, "max_new_tokens": 20, "repetition_penalty": 1.1}


def test_per_prompt_values_follow_their_prompts_in_a_subset():
    r = Request(["a", "b", "c"], temperature=[0.1, 0.2, 0.3], seed=[7, 8, 9], logit_bias={5: 1.0}, top_k=4)
    sub = r.subset([2, 0, 2])
    assert sub.prompts == ["c", "a", "c"] and sub.temperature == [0.3, 0.1, 0.3] and sub.seed == [9, 7, 9]
    assert sub.logit_bias == {5: 1.0} and sub.top_k == 4  # one value for all prompts stays one value


def test_per_prompt_values_reach_their_rows(params, cfg):
    prompts = [[1, 5, 9], [1, 7]]
    mixed = generate(params, cfg, prompts, max_new_tokens=6, temperature=[0.0, 1.0], seed=[0, 3], eos_token_id=[],
                     num_return_sequences=2).token_ids
    first = generate(params, cfg, prompts[:1], max_new_tokens=6, temperature=0.0, eos_token_id=[]).token_ids[0]
    second = generate(params, cfg, prompts[1:], max_new_tokens=6, temperature=1.0, seed=3, eos_token_id=[],
                      num_return_sequences=2).token_ids
    assert mixed == [first, first, *second]


def test_a_chat_is_a_prompt_and_system_a_request_option(params, cfg, tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    ids = build_prompt(tokenizer, "hi", system="Be brief.")
    eos = [tokenizer.eos_id, tokenizer.special_tokens["<|end|>"]]  # the jaxllm template's end of turn
    want = generate(params, cfg, [ids], tokenizer=tokenizer, max_new_tokens=8, temperature=0.0, eos_token_id=eos).token_ids
    by_messages = generate(params, cfg, messages, tokenizer=tokenizer, max_new_tokens=8, temperature=0.0).token_ids
    by_options = generate(params, cfg, "hi", tokenizer=tokenizer, system="Be brief.", max_new_tokens=8, temperature=0.0).token_ids
    assert by_messages == by_options == want


def test_sample_py_defaults_are_the_apis(checkpoint, cfg, params, tokenizer, capsys):
    """No sampling flag: the same output as generate() with no sampling option (temperature 1.0 included)."""
    rc, out, err = run_cli(sample.main, ["--checkpoint", str(checkpoint), "--prompt", "def f(x):", "--seed", "5",
                                         "--format", "jsonl", "--no_compile_cache"], capsys)
    assert rc == 0, err
    want = generate(params, cfg, ["def f(x):"], tokenizer=tokenizer, seed=5)
    assert json.loads(out)["token_ids"] == want.token_ids[0] and len(want.token_ids[0]) <= Request.max_new_tokens


def test_logprobs_are_printed_in_text_output(checkpoint, capsys):
    argv = ["--checkpoint", str(checkpoint), "--prompt", "for i", "--max_new_tokens", "5", "--temperature", "0",
            "--logprobs", "2", "--no_compile_cache"]
    rc, out, err = run_cli(sample.main, argv + ["--format", "jsonl"], capsys)
    assert rc == 0, err
    row = json.loads(out)
    rc, out, err = run_cli(sample.main, argv, capsys)
    assert rc == 0, err
    lines = out.splitlines()
    at = lines.index(f"[logprobs] {len(row['token_ids'])} tokens, sum {sum(row['logprobs']):.4f}")
    assert "\n".join(lines[:at]) == "for i" + row["text"]
    steps = lines[at + 1 :]
    assert len(steps) == len(row["token_ids"])
    for line, lp, alternatives in zip(steps, row["logprobs"], row["top_logprobs"]):
        assert f" {lp:.4f}" in line and all(f" {v:.4f}" in line for v in alternatives.values())
    rc, streamed, err = run_cli(sample.main, argv + ["--stream"], capsys)
    assert rc == 0 and streamed == out, err  # streamed, the table follows the text too


@pytest.mark.parametrize("flags, both", [
    (["--group_size", "32"], ("--group_size", "--quantize int4")),
    (["--quantize", "int8", "--group_size", "32"], ("--group_size", "--quantize int8")),
    (["--warmup", "--num_beams", "2"], ("--warmup", "--num_beams")),
    (["--stream", "--n", "2"], ("--stream", "--num_return_sequences")),
    (["--kv_cache", "int8"], ("--kv_cache", "--kv_cache_dtype")),
    (["--draft_checkpoint", "d"], ("--draft_checkpoint", "--draft")),
])
def test_sample_py_refuses_flags_that_do_not_combine_naming_both(checkpoint, capsys, flags, both):
    rc, out, err = run_cli(sample.main, ["--checkpoint", str(checkpoint), "--prompt", "x", *flags], capsys)
    assert rc == 2 and out == "" and len(err.splitlines()) == 1 and all(name in err for name in both), err
