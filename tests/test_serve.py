"""The OpenAI-compatible server, through the official `openai` client and raw httpx.

The reference for every output is `jaxllm.generate` run on the request alone (a batch-1
program with one shared cursor, a different program from the server's slots): greedy and
seeded requests must give the same tokens whatever else the server is decoding.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import jsonschema
import numpy as np
import openai
import pydantic
import pytest

import jaxllm
from jaxllm.serve.app import create_app
from jaxllm.serve.engine import Engine

from serving import health, serve, wait_until

# Engines made with the same slots (and logprob alternatives) share their compiled programs; the
# chunk length is traced. The load test uses them too; the warmup test has programs of its own.
SHARED = dict(slots=4, chunk=4)
PROMPTS = ["def add(x, y):\n", "the of and", "class Point:\n    def __init__(self):\n", "import os\nimport", "in is was"]


@pytest.fixture(scope="module")
def engine(params, cfg, tokenizer):
    return Engine(params, cfg, tokenizer, **SHARED)


@pytest.fixture(scope="module")
def url(engine):
    with serve(create_app(engine, model_name="tiny", max_n=4, max_body_bytes=64 * 1024)) as url:
        yield url


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def alone(params, cfg, tokenizer, prompt, **options):
    """The reference: the same request through `generate`, by itself."""
    return jaxllm.generate(params, cfg, prompt, tokenizer=tokenizer, **options)


# ---------------------------------------------------------------------------- the API through openai's client


def test_completion_equals_the_request_run_alone(client, params, cfg, tokenizer):
    out = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=20, temperature=0)
    ref = alone(params, cfg, tokenizer, PROMPTS[0], max_new_tokens=20, temperature=0)
    assert out.choices[0].text == ref.texts[0]
    assert out.choices[0].finish_reason == {"eos": "stop", "length": "length"}[ref.finish_reasons[0]]
    assert out.usage.prompt_tokens == ref.num_prompt_tokens[0]
    assert out.usage.completion_tokens == len(ref.token_ids[0])
    assert out.object == "text_completion" and out.model == "tiny"


def test_seeded_samples_equal_the_request_run_alone(client, params, cfg, tokenizer):
    options = dict(temperature=0.9, top_p=0.95, top_k=40, seed=1234)
    out = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=16, n=2, temperature=0.9, top_p=0.95,
                                    seed=1234, extra_body={"top_k": 40})
    ref = alone(params, cfg, tokenizer, PROMPTS[1], max_new_tokens=16, num_return_sequences=2, **options)
    assert [c.text for c in out.choices] == ref.texts
    assert ref.texts[0] != ref.texts[1]  # n samples are independent streams


def test_chat_uses_the_models_template(client, params, cfg, tokenizer):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the of"}]
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    ref = alone(params, cfg, tokenizer, [messages], max_new_tokens=12, temperature=0)
    assert out.choices[0].message.content == ref.texts[0]
    assert out.choices[0].message.role == "assistant" and out.object == "chat.completion"


def test_stream_pieces_join_to_the_whole_text_with_usage(client):
    kw = dict(model="tiny", prompt=PROMPTS[2], max_tokens=40, temperature=0)
    whole = client.completions.create(**kw)
    events = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    texts = [e.choices[0].text for e in events if e.choices and e.choices[0].text]
    assert "".join(texts) == whole.choices[0].text
    assert len(texts) >= 3  # handed out chunk by chunk, not at the end
    assert [e.choices[0].finish_reason for e in events if e.choices][-1] == whole.choices[0].finish_reason
    assert events[-1].usage.completion_tokens == whole.usage.completion_tokens and events[-1].choices == []


def test_chat_stream_opens_with_the_role(client):
    kw = dict(model="tiny", messages=[{"role": "user", "content": "in is"}], max_tokens=24, temperature=0)
    whole = client.chat.completions.create(**kw).choices[0].message.content
    events = list(client.chat.completions.create(**kw, stream=True))
    assert events[0].choices[0].delta.role == "assistant"
    assert "".join(e.choices[0].delta.content or "" for e in events) == whole


class Reading(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=6)
    value: bool


def test_json_schema_output_parses_and_validates(client):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}, "value": {"type": "integer"}},
              "required": ["name", "value"], "additionalProperties": False}
    out = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "a reading"}], max_tokens=48, temperature=0.8, seed=3,
        response_format={"type": "json_schema", "json_schema": {"name": "reading", "schema": schema}},
    )
    jsonschema.validate(json.loads(out.choices[0].message.content), schema)
    # the client's own structured-output helper: a pydantic model's strict schema, parsed back
    parsed = client.chat.completions.parse(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=48,
                                           temperature=0.8, seed=5, response_format=Reading)
    message = parsed.choices[0].message
    jsonschema.validate(message.parsed.model_dump(), Reading.model_json_schema())
    assert json.loads(message.content) == message.parsed.model_dump()


def test_json_object_regex_and_choice(client):
    obj = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=40,
                                         temperature=1.0, seed=0, response_format={"type": "json_object"})
    assert isinstance(json.loads(obj.choices[0].message.content), dict)
    regex = client.completions.create(model="tiny", prompt="id:", max_tokens=12, temperature=1.0, seed=1,
                                      extra_body={"guided_regex": "[a-c]{2}-[0-9]{3}"})
    import re

    assert re.fullmatch("[a-c]{2}-[0-9]{3}", regex.choices[0].text)
    choice = client.completions.create(model="tiny", prompt="pick:", max_tokens=8, temperature=1.0, seed=2,
                                       extra_body={"guided_choice": ["alpha", "beta", "gamma"]})
    assert choice.choices[0].text in ("alpha", "beta", "gamma")


def test_logprobs_equal_generates(client, params, cfg, tokenizer):
    out = client.completions.create(model="tiny", prompt=PROMPTS[3], max_tokens=8, temperature=0, logprobs=2)
    ref = alone(params, cfg, tokenizer, PROMPTS[3], max_new_tokens=8, temperature=0, logprobs=2)
    lp = out.choices[0].logprobs
    np.testing.assert_allclose(lp.token_logprobs, ref.logprobs[0], atol=1e-5)
    assert [tokenizer.bytes_of([i]).decode("utf-8", "replace") for i in ref.token_ids[0]] == lp.tokens
    for top, want in zip(lp.top_logprobs, ref.top_logprobs[0]):  # keyed by text: two byte tokens may share "\ufffd"
        texts = {tokenizer.bytes_of([i]).decode("utf-8", "replace"): v for i, v in want.items()}
        assert top.keys() == texts.keys() and np.allclose([top[t] for t in texts], list(texts.values()), atol=1e-5)
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "the"}], max_tokens=4,
                                          temperature=0, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(c.top_logprobs) == 3 for c in content)
    assert all(c.logprob <= 0 and c.top_logprobs[0].logprob >= c.logprob - 1e-6 for c in content)


def test_stop_strings_and_penalties_follow_generate(client, params, cfg, tokenizer):
    ref = alone(params, cfg, tokenizer, PROMPTS[0], max_new_tokens=30, temperature=0)
    stop = ref.texts[0][5:8]  # a string the greedy output does contain
    options = dict(temperature=0, presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.2, logit_bias={7: -5.0})
    want = alone(params, cfg, tokenizer, PROMPTS[0], max_new_tokens=30, stop=[stop], **options)
    out = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=30, stop=[stop], temperature=0,
                                    presence_penalty=0.5, frequency_penalty=0.3, logit_bias={"7": -5},
                                    extra_body={"repetition_penalty": 1.2})
    assert out.choices[0].text == want.texts[0]
    assert out.choices[0].finish_reason == ("stop" if want.finish_reasons[0] in ("stop", "eos") else "length")


def test_models_and_health(client, url):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    h = health(url)
    assert h["status"] == "ok" and h["slots"] == 4


# ---------------------------------------------------------------------------- a request is the same whatever shares the batch


def test_output_does_not_depend_on_batch_mates(url, params, cfg, tokenizer):
    """Seeded and greedy requests sent alone, then together with others of other lengths that join
    and leave while they run: the same text each time, and each equals `generate` alone."""
    bodies = [dict(prompt=p, max_tokens=10 + 9 * i, temperature=0.0 if i % 2 else 1.1, seed=100 + i, top_p=0.9)
              for i, p in enumerate(PROMPTS)]

    async def run(batch):
        async with httpx.AsyncClient(base_url=url, timeout=120) as http:
            replies = await asyncio.gather(*(http.post("/v1/completions", json=b) for b in batch))
        return [r.json()["choices"][0]["text"] for r in replies]

    together = asyncio.run(run(bodies))
    for body, text in zip(bodies, together):
        ref = alone(params, cfg, tokenizer, body["prompt"], max_new_tokens=body["max_tokens"],
                    temperature=body["temperature"], seed=body["seed"], top_p=0.9)
        assert text == ref.texts[0], body


# ---------------------------------------------------------------------------- errors: one OpenAI error object, 4xx, never 500


def _error(reply: httpx.Response, status: int) -> dict:
    assert reply.status_code == status, reply.text
    err = reply.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


@pytest.mark.parametrize("body, param", [
    ('{"prompt": "x", ', None),  # malformed JSON
    ('[1, 2]', None),  # not an object
    ('{"prompt": "x", "temperature": "hot"}', "temperature"),
    ('{"prompt": "x", "temperature": 2.5}', "temperature"),
    ('{"prompt": "x", "max_tokens": 0}', "max_tokens"),
    ('{"prompt": "x", "max_tokens": 100000}', None),  # more than the context
    ('{"prompt": "x", "n": 9}', "n"),
    ('{"prompt": "x", "top_p": 0}', "top_p"),
    ('{"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}', "stop"),
    ('{"prompt": "x", "logit_bias": {"abc": 1}}', "logit_bias"),
    ('{"prompt": "x", "logit_bias": {"3": 500}}', "logit_bias"),
    ('{"prompt": "x", "logit_bias": {"\u00b2": 1}}', "logit_bias"),  # "²" is a digit to str.isdigit, not to int()
    ('{"prompt": "x", "model": "gpt-9"}', "model"),
    ('{"prompt": "x", "frobnicate": 1}', "frobnicate"),
    ('{"prompt": "x", "echo": true}', "echo"),
    ('{"prompt": "", "max_tokens": 3}', "prompt"),
    ('{"prompt": [99999]}', "prompt"),
    ('{"prompt": "x", "logprobs": 9}', None),  # more alternatives than the server's --max_logprobs
    ('{"prompt": "x", "stream": true, "logprobs": 1}', "logprobs"),
    ('{"prompt": "x", "guided_regex": "(unclosed"}', "guided_regex"),
    ('{"prompt": "x", "guided_regex": "a", "guided_choice": ["b"]}', "guided_choice"),
    ('{"max_tokens": 3}', "prompt"),
    ('{"prompt": "x", "temperature": NaN}', "temperature"),
])
def test_bad_completion_requests_get_400(url, body, param):
    err = _error(httpx.post(f"{url}/v1/completions", content=body, headers={"content-type": "application/json"}), 400)
    if param:
        assert err["param"] == param


@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "xml"}}, "response_format"),
    ({"messages": [{"role": "user", "content": "x" * 3000}]}, "messages"),  # more tokens than the context
])
def test_bad_chat_requests_get_400(url, body, param):
    assert _error(httpx.post(f"{url}/v1/chat/completions", json=body), 400)["param"] == param


def test_size_limits_and_unknown_paths(url):
    _error(httpx.post(f"{url}/v1/completions", content=b'{"prompt": "' + b"a" * 70_000 + b'"}'), 413)
    _error(httpx.get(f"{url}/v1/nothing"), 404)
    _error(httpx.get(f"{url}/v1/completions"), 405)


def test_api_key_is_required_when_set(params, cfg, tokenizer):
    engine = Engine(params, cfg, tokenizer, **SHARED)
    with serve(create_app(engine, model_name="tiny", api_key="s3cret")) as url:
        assert _error(httpx.get(f"{url}/v1/models"), 401)["code"] == "invalid_api_key"
        _error(httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
        good = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0)
        assert good.completions.create(model="tiny", prompt="the", max_tokens=2).usage.completion_tokens >= 1
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0).models.list()
        assert httpx.get(f"{url}/health").status_code == 200  # health needs no key


def test_a_full_queue_answers_503_with_retry_after(params, cfg, tokenizer):
    engine = Engine(params, cfg, tokenizer, **SHARED | dict(max_queue=1))
    body = dict(prompt="the of", max_tokens=100, ignore_eos=True, temperature=0)

    async def burst():
        async with httpx.AsyncClient(base_url=url, timeout=120) as http:
            return await asyncio.gather(*(http.post("/v1/completions", json=body) for _ in range(7)))

    with serve(create_app(engine, model_name="tiny")) as url:
        replies = asyncio.run(burst())
    codes = sorted(r.status_code for r in replies)
    assert codes.count(200) >= 1 and codes.count(503) >= 1 and set(codes) <= {200, 503}, codes
    busy = next(r for r in replies if r.status_code == 503)
    assert busy.headers["retry-after"] == "1" and _error(busy, 503)["code"] == "server_busy"
    assert all(len(r.json()["choices"][0]["text"]) > 0 for r in replies if r.status_code == 200)


def test_a_client_that_goes_away_frees_its_slot(url, engine):
    before = engine.stats["cancelled"]
    with httpx.stream("POST", f"{url}/v1/completions", timeout=60,
                      json=dict(prompt="the", max_tokens=110, ignore_eos=True, stream=True)) as reply:
        for line in reply.iter_lines():
            if line.startswith("data: {"):
                break  # one piece read, then the connection closes
    assert wait_until(lambda: health(url)["busy_slots"] == 0, timeout=10)
    assert engine.stats["cancelled"] == before + 1


def test_warmup_compiles_every_program_serving_needs(params, cfg, tokenizer):
    engine = Engine(params, cfg, tokenizer, slots=3, chunk=3, context=64)  # shapes no other test uses
    done = engine.warmup()
    assert done["programs"] == 5 + 3 * 1  # prompt buckets 16, 24, 32, 48, 64; rows 1, 2, 3 by view 64
    compiled = engine.stats["compile_s"]
    with serve(create_app(engine, model_name="tiny")) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        for n, m in ((3, 20), (20, 20), (40, 20), (63, 1)):  # four prompt buckets, the last the context
            client.completions.create(model="tiny", prompt=[5] * n, max_tokens=m, temperature=0)
    assert engine.stats["compile_s"] == compiled


def test_an_engine_failure_fails_the_running_requests_and_serving_goes_on(params, cfg, tokenizer, monkeypatch):
    engine = Engine(params, cfg, tokenizer, **SHARED)
    real, calls = engine._decode, []

    def broken_once():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected")
        return real()

    monkeypatch.setattr(engine, "_decode", broken_once)
    with serve(create_app(engine, model_name="tiny")) as url:
        err = _error(httpx.post(f"{url}/v1/completions", json=dict(prompt="the", max_tokens=5), timeout=60), 500)
        assert "injected" in err["message"]
        again = httpx.post(f"{url}/v1/completions", json=dict(prompt="the", max_tokens=5, temperature=0), timeout=60)
        assert again.status_code == 200 and again.json()["usage"]["completion_tokens"] == 5


def test_a_full_constraint_registry_restarts_without_breaking_running_rows(params, cfg, tokenizer):
    """Constraints share one automaton; when it is full it restarts from the running rows'
    constraints and renumbers their states. A row running through a restart ends as it would
    alone. (The engine is stepped by hand here, so the restart comes at a known point.)"""
    from jaxllm.request import Request
    from jaxllm.serve.engine import Job

    engine = Engine(params, cfg, tokenizer, **SHARED | dict(chunk=2))
    engine.registry.limit = 2
    results = {}

    def submit(name, prompt, **options):
        keep = lambda event, name=name: event[0] == "text" or results.setdefault(name, event)  # the end: done or error
        job = Job(Request(prompt, temperature=0, **options), keep)
        job.prepared = engine.prepare(job.request)
        engine.submit(job)
        engine._admit_waiting()
        return job

    def run_until(name):
        while name not in results:
            engine._decode()

    pattern = "[a-z]{6}( [a-z]{6}){3}"
    submit("first", "a", max_new_tokens=6, choice=["yes", "no"])  # registry: [choice]
    run_until("first")
    long = submit("long", "the of", max_new_tokens=40, regex=pattern)  # registry: [choice, regex]
    engine._decode()
    offset = engine.registry._offsets()[1]
    assert not long.cancelled and "long" not in results  # still running
    submit("third", "x", max_new_tokens=5, regex="[0-9]{3}")  # full: restarts as [regex (running), [0-9]{3}]
    assert [c.pattern for c in engine.registry.items] == [pattern, "[0-9]{3}"]
    assert engine.registry._offsets()[0] != offset  # the running row's states moved
    run_until("long")
    run_until("third")
    kind, result = results["long"]
    ref = alone(params, cfg, tokenizer, "the of", max_new_tokens=40, temperature=0, regex=pattern)
    assert kind == "done" and result.texts == ref.texts and result.valid == [True]
    assert results["third"][1].valid == [True]


def test_a_non_streaming_client_that_goes_away_frees_its_slot(params, cfg, tokenizer, monkeypatch):
    engine = Engine(params, cfg, tokenizer, **SHARED)
    real = engine._decode

    def slow():  # 120 tokens take 1.5 s or more: far longer than the client waits
        time.sleep(0.05)
        return real()

    monkeypatch.setattr(engine, "_decode", slow)
    with serve(create_app(engine, model_name="tiny")) as url:
        with pytest.raises(httpx.ReadTimeout):  # the client gives up after 0.3 s
            httpx.post(f"{url}/v1/completions", json=dict(prompt="the", max_tokens=120, ignore_eos=True), timeout=0.3)
        assert wait_until(lambda: health(url)["busy_slots"] == 0 and engine.queued == 0, timeout=10)
        time.sleep(2.0)  # long enough for a job nobody cancelled to finish
        assert engine.stats["finished"] == 0 and engine.stats["admitted"] <= 1
