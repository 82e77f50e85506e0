"""The server under load, and its shutdown.

Load: 64 concurrent clients on loopback, mixed prompt and output lengths, streaming and not,
16 times as many clients as slots (so requests queue, join and leave between chunks). No 5xx, no lost
or mixed-up response: every greedy reply equals the same request run alone through `generate`.
The process's memory is flat from one round to the next.

Shutdown: `python -m jaxllm.serve` in a process of its own gets SIGTERM while a stream runs:
it stops taking connections, the stream finishes, and the process exits with 0.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import re
import signal
import subprocess
import sys
import time

import httpx
import psutil
import pytest

import jaxllm
from jaxllm.checkpoint import save_checkpoint
from jaxllm.serve.app import create_app
from jaxllm.serve.engine import Engine

from serving import health, serve

CLIENTS = 64
PROMPTS = ["def f(x):\n    return", "the of and to in", "class A:\n", "import", "for i in range(10):\n   ",
           "with as by at from it an be this which or are", "x = [", "in is was for on that"]
LENGTHS = [3, 9, 17, 30]


def _body(i: int) -> dict:
    return dict(prompt=PROMPTS[i % len(PROMPTS)], max_tokens=LENGTHS[(i // len(PROMPTS)) % len(LENGTHS)],
                temperature=0, stream=i % 2 == 1)


async def _client(http: httpx.AsyncClient, body: dict) -> tuple[int, str]:
    if not body["stream"]:
        reply = await http.post("/v1/completions", json=body)
        return reply.status_code, reply.json()["choices"][0]["text"] if reply.status_code == 200 else reply.text
    pieces, done = [], False
    async with http.stream("POST", "/v1/completions", json=body) as reply:
        if reply.status_code != 200:
            return reply.status_code, (await reply.aread()).decode()
        async for line in reply.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                pieces.append(json.loads(line[6:])["choices"][0]["text"])
    return (200 if done else 599), "".join(pieces)


async def _load(url: str) -> list[tuple[int, str]]:
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:
        return await asyncio.gather(*(_client(http, _body(i)) for i in range(CLIENTS)))


def test_64_clients_get_their_own_answers_and_memory_stays_flat(params, cfg, tokenizer):
    engine = Engine(params, cfg, tokenizer, slots=4, chunk=4, max_queue=CLIENTS)  # test_serve.py's programs
    engine.warmup()  # every program compiled first: a program compiled mid-run is memory that stays, not a leak
    expected = {}
    for i in range(CLIENTS):
        key = (_body(i)["prompt"], _body(i)["max_tokens"])
        if key not in expected:
            expected[key] = jaxllm.generate(params, cfg, key[0], tokenizer=tokenizer, max_new_tokens=key[1],
                                            temperature=0).texts[0]
    process = psutil.Process()
    with serve(create_app(engine, model_name="tiny")) as url:
        rss = []
        for _ in range(3):  # the first round settles the allocator; the later ones must not grow
            replies = asyncio.run(_load(url))
            assert [status for status, _ in replies] == [200] * CLIENTS, [r for r in replies if r[0] != 200][:3]
            for i, (_, text) in enumerate(replies):
                b = _body(i)
                assert text == expected[b["prompt"], b["max_tokens"]], (i, b)
            gc.collect()
            rss.append(process.memory_info().rss)
        assert health(url)["busy_slots"] == 0 and engine.queued == 0 and not engine.jobs
    assert engine.stats["finished"] == 3 * CLIENTS
    growth = (rss[2] - rss[1]) / 2**20
    assert growth < 24, f"memory grew {growth:.1f} MiB from round 2 to round 3 ({[r / 2**20 for r in rss]})"


def test_sigterm_finishes_running_streams_then_exits(params, cfg, tokenizer, tmp_path):
    checkpoint = save_checkpoint(tmp_path / "tiny", params, cfg, tokenizer)
    env = dict(os.environ, JAXLLM_API_KEY="")
    server = subprocess.Popen(
        [sys.executable, "-m", "jaxllm.serve", "--checkpoint", str(checkpoint), "--port", "0", "--slots", "2",
         "--chunk", "2", "--grace", "20"],
        stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        line = server.stderr.readline()
        port = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        assert port, line
        url = f"http://127.0.0.1:{port.group(1)}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        body = dict(prompt="the of", max_tokens=100, ignore_eos=True, temperature=0, stream=True)
        pieces, done = [], False
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as reply:
            for line in reply.iter_lines():
                if line.startswith("data: {"):
                    pieces.append(json.loads(line[6:]))
                    if len(pieces) == 1:
                        server.send_signal(signal.SIGTERM)
                        time.sleep(0.5)
                        with pytest.raises(httpx.TransportError):  # no new connections once shutting down
                            httpx.get(f"{url}/health", timeout=2)
                done = done or line == "data: [DONE]"
        assert done and pieces[-1]["choices"][0]["finish_reason"] == "length"
        assert server.wait(timeout=60) == 0
    finally:
        if server.poll() is None:
            server.kill()
        server.stderr.close()
