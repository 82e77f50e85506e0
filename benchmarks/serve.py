"""Serving speed: jaxllm's OpenAI-compatible server against llama.cpp's llama-server, N concurrent streaming clients.

Run from the repository root:

    python benchmarks/serve.py --prepare out/spec_bench/small --llama_cpp DIR   # once: the HF directory and both GGUFs
    python benchmarks/serve.py --llama_server DIR/build/bin/llama-server        # both servers, float32, 1/4/16/64 clients
    python benchmarks/serve.py --dtype int8 --llama_server ...                  # jaxllm --quantize int8 vs the q8_0 GGUF
    python benchmarks/serve.py --skip_llama --clients 1,16                      # jaxllm only
    python benchmarks/serve.py --base_url http://127.0.0.1:8000 --clients 1,4   # a server that is already running
    python benchmarks/serve.py ... --out FILE.md                                # also append the tables to a markdown file

Weights: both servers read the same Hugging Face directory (--checkpoint, default
out/serve_bench/small_hf): jaxllm directly, llama-server through the GGUF that llama.cpp's own
convert_hf_to_gguf.py makes of it (--outtype f32 for --dtype float32, q8_0 for int8).
`--prepare CKPT` writes both: jaxllm.hf.export_hf of a jaxllm checkpoint (with the context set
to --context, the small preset's 1024), then the converter of the llama.cpp tree at --llama_cpp
(llama-cpp-python's sdist vendors one under vendor/llama.cpp; build only its llama-server target).

Servers: each is started as a subprocess on a free port (jaxllm_command and llama_command below
hold their flags, in one place each), benchmarked once its GET /health answers 200, and
stopped. Both get --slots sequences in flight (jaxllm --slots, llama-server --parallel, each slot
--context tokens); llama-server gets --llama_threads threads and a KV cache of --llama_kv type
(f32 by default, as jaxllm keeps it in its float32 compute dtype). Their logs go to
out/serve_bench/logs/. llama.cpp's threads wait for each other spinning: with other processes on
the same cores its speed falls several-fold, so measure on a quiet machine (the load average is
printed before and after).

Load: at each concurrency in --clients, that many clients each send --requests requests one
after another: a streaming POST /v1/completions with temperature 0, max_tokens --max_tokens and
ignore_eos (and min_tokens = max_tokens with --min_tokens), so that every request makes exactly
max_tokens tokens. Every request of a run has its own prompt, a slice of standard-library
source whose length in characters is drawn uniformly from --prompt_chars by a seeded RNG, so no
server gains from a prompt cache, and both servers get the same prompts in the same order.
Before each concurrency is measured, max(--warmup, clients) unmeasured requests run at that
concurrency, their prompt lengths spread over the whole range, so that compiling is not timed
(--warmup 0: none).

Columns: "tok/s" is all output tokens of the level over its wall time (first request sent to the
last stream closed). Output tokens are the server's `usage.completion_tokens` (requested with
stream_options.include_usage), else the count of text events. "TTFT" is request sent -> first
non-empty text event (it includes the wait for a free slot when clients > slots). "ITL" is the
gap between consecutive text events of one stream (per-token latency when each event carries
one token; "tok/event" says whether it does). "TPOT" (time per output token, the per-token
latency comparable across servers whatever they put in one event) is a request's (last event -
first event) / (tokens - 1), its p50 and p99 over requests. The client runs on the same machine as the server: on a
small machine its event parsing takes a little of the server's CPU, the same for both servers.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "out" / "serve_bench"
GGUF_TYPES = {"float32": "f32", "int8": "q8_0"}  # --dtype -> convert_hf_to_gguf.py --outtype and GGUF file suffix
TARGETS = {"scaling": 4.0, "vs_llama": 1.0}  # issue #18: at 16 clients >= 4x one client's tok/s, and >= llama-server's


# ---------------------------------------------------------------------------- the servers' command lines


def jaxllm_command(args, port: int) -> list[str]:
    """`python -m jaxllm.serve` with --slots sequences in flight; --dtype int8 is weight-only int8
    with float32 compute."""
    cmd = [sys.executable, "-m", "jaxllm.serve", "--checkpoint", str(args.checkpoint), "--port", str(port),
           "--slots", str(args.slots), "--compute_dtype", "float32"]
    if args.dtype == "int8":
        cmd += ["--quantize", "int8"]
    return cmd + args.jaxllm_args.split()


def llama_command(args, port: int) -> list[str]:
    """llama-server with --slots parallel sequences of --context tokens each, all its threads on
    prompts and decoding alike, and no prompt cache kept in RAM between requests."""
    threads = str(args.llama_threads)
    cmd = [str(args.llama_server), "--model", str(args.gguf), "--host", "127.0.0.1", "--port", str(port),
           "--parallel", str(args.slots), "--ctx-size", str(args.slots * args.context),
           "--threads", threads, "--threads-batch", threads, "--cache-type-k", args.llama_kv, "--cache-type-v", args.llama_kv,
           "--cache-ram", "0", "--no-webui"]
    return cmd + args.llama_args.split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server subprocess, its output in `log`; `with` waits for GET /health == 200 and stops it after."""

    def __init__(self, name: str, cmd: list[str], port: int, log: Path, start_timeout: float):
        self.name, self.cmd, self.log, self.start_timeout = name, cmd, log, start_timeout
        self.base_url = f"http://127.0.0.1:{port}"
        self.proc = None

    def __enter__(self) -> Server:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        print(f"[{self.name}] starting: {' '.join(self.cmd)}\n[{self.name}] log: {self.log}", flush=True)
        with open(self.log, "w") as f:
            self.proc = subprocess.Popen(self.cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        t0 = time.perf_counter()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with status {self.proc.returncode} before it was ready:\n{self.tail()}")
            try:
                if httpx.get(self.base_url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.perf_counter() - t0 > self.start_timeout:
                self.__exit__()
                raise RuntimeError(f"{self.name} not ready after {self.start_timeout:.0f}s:\n{self.tail()}")
            time.sleep(0.5)
        print(f"[{self.name}] ready in {time.perf_counter() - t0:.1f}s at {self.base_url}", flush=True)
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)  # the process we started, by its pid
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def tail(self, lines: int = 20) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


# ---------------------------------------------------------------------------- prompts


CORPUS_MODULES = ["argparse", "textwrap", "string", "shlex", "difflib", "fractions", "heapq", "bisect", "csv", "dataclasses",
                  "functools", "json.decoder", "json.encoder", "html", "colorsys", "calendar", "gettext", "pprint"]


def corpus() -> tuple[str, list[int]]:
    """Standard-library source (a fixed list of modules, in order) and the offsets its lines start at."""
    import importlib
    import inspect

    text = "\n".join(inspect.getsource(importlib.import_module(m)) for m in CORPUS_MODULES)
    starts = [0] + [i + 1 for i, c in enumerate(text) if c == "\n"]
    return text, starts[:-1]


class Prompts:
    """prompt(i): a slice of the corpus starting at a line, its length uniform in [lo, hi] characters,
    the same for the same (seed, i) on the same Python; spread(i, n): the i-th of n lengths spread
    evenly over the range (warm-up prompts, numbered apart from the measured ones)."""

    def __init__(self, lo: int, hi: int, seed: int):
        self.text, self.starts = corpus()
        self.lo, self.hi, self.seed = lo, hi, seed

    def _slice(self, rng: random.Random, length: int) -> str:
        start = rng.choice(self.starts)
        while start + length > len(self.text):
            start = rng.choice(self.starts)
        return self.text[start:start + length]

    def prompt(self, i: int) -> str:
        rng = random.Random(f"{self.seed}:{i}")
        return self._slice(rng, rng.randint(self.lo, self.hi))

    def spread(self, i: int, n: int) -> str:
        rng = random.Random(f"{self.seed}:warmup:{i}")
        return self._slice(rng, self.lo + (self.hi - self.lo) * i // max(n - 1, 1))


# ---------------------------------------------------------------------------- the load generator


@dataclass
class Record:
    """One request: times are perf_counter seconds."""

    sent: float
    events: list[float] = field(default_factory=list)  # arrival of each non-empty text event
    usage_tokens: int | None = None
    prompt_tokens: int | None = None
    finish_reason: str | None = None
    done: float = 0.0
    error: str | None = None

    @property
    def tokens(self) -> int:
        return self.usage_tokens if self.usage_tokens is not None else len(self.events)


def request_body(args, model: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True}
    if args.min_tokens:
        body["min_tokens"] = max_tokens
    return body


async def one_request(client: httpx.AsyncClient, url: str, body: dict) -> Record:
    """Streams one completion: `data: {json}` lines until `data: [DONE]`."""
    rec = Record(sent=time.perf_counter())
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                rec.error = f"HTTP {response.status_code}: {(await response.aread()).decode(errors='replace')[:300]}"
                return rec
            async for line in response.aiter_lines():
                now = time.perf_counter()
                if not line.startswith("data:"):
                    continue  # blank separators, comments, `event:` lines
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    rec.error = str(event["error"])[:300]
                    break
                for choice in event.get("choices") or []:
                    if choice.get("text"):
                        rec.events.append(now)
                    rec.finish_reason = choice.get("finish_reason") or rec.finish_reason
                usage = event.get("usage")
                if usage:
                    rec.usage_tokens = usage.get("completion_tokens", rec.usage_tokens)
                    rec.prompt_tokens = usage.get("prompt_tokens", rec.prompt_tokens)
    except (httpx.HTTPError, ValueError) as e:
        rec.error = f"{type(e).__name__}: {e}"
    rec.done = time.perf_counter()
    return rec


async def run_level(args, base_url: str, model: str, prompts: Prompts, clients: int, first: int) -> dict:
    """`clients` clients, each sending its requests one after another; prompts numbered from `first`.
    First, unmeasured: max(--warmup, clients) requests at the same concurrency, their prompt lengths
    spread over the whole range (a server that compiles per prompt length compiles them there)."""
    url = base_url + "/v1/completions"
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.request_timeout), limits=limits) as client:

        async def client_loop(c: int, prompt_of) -> list[Record]:
            """Client c's requests: prompt_of(c, r) for r = 0, 1, ... until it gives None."""
            out, r = [], 0
            while (prompt := prompt_of(c, r)) is not None:
                out.append(await one_request(client, url, request_body(args, model, prompt, args.max_tokens)))
                r += 1
            return out

        async def drive(prompt_of) -> list[Record]:
            return [rec for recs in await asyncio.gather(*(client_loop(c, prompt_of) for c in range(clients))) for rec in recs]

        if args.warmup:
            n = max(args.warmup, clients)
            warm = await drive(lambda c, r: prompts.spread(c + r * clients, n) if c + r * clients < n else None)
            failed = [w.error for w in warm if w.error]
            if failed:
                print(f"warning: {len(failed)} of {n} warm-up requests failed, first: {failed[0]}")
        t0 = time.perf_counter()
        records = await drive(lambda c, r: prompts.prompt(first + c * args.requests + r) if r < args.requests else None)
        wall = time.perf_counter() - t0
    return summarize(records, wall, clients, args.max_tokens)


def summarize(records: list[Record], wall: float, clients: int, max_tokens: int) -> dict:
    ok = [r for r in records if r.error is None and r.events]
    errors = [r.error or "no text events" for r in records if r.error is not None or not r.events]
    ttft = [1e3 * (r.events[0] - r.sent) for r in ok]
    itl = [1e3 * (b - a) for r in ok for a, b in zip(r.events, r.events[1:])]
    tpot = [1e3 * (r.events[-1] - r.events[0]) / (r.tokens - 1) for r in ok if r.tokens > 1]
    tokens = sum(r.tokens for r in ok)
    pct = lambda xs, q: float(np.percentile(xs, q)) if xs else None
    return dict(clients=clients, requests=len(records), ok=len(ok), errors=errors, wall_s=wall, tokens=tokens,
                tok_s=tokens / wall, ttft50=pct(ttft, 50), ttft99=pct(ttft, 99), itl50=pct(itl, 50), itl99=pct(itl, 99),
                tpot50=pct(tpot, 50), tpot99=pct(tpot, 99), tok_per_event=tokens / max(sum(len(r.events) for r in ok), 1),
                prompt_tokens=sum(r.prompt_tokens or 0 for r in ok), short=sum(r.tokens != max_tokens for r in ok),
                usage=all(r.usage_tokens is not None for r in ok))


def model_name(base_url: str) -> str:
    """The first id GET /v1/models lists (some servers want `model` to name it), else "default"."""
    try:
        data = httpx.get(base_url + "/v1/models", timeout=10).json().get("data") or []
        return data[0]["id"] if data else "default"
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return "default"


def bench(args, name: str, base_url: str, prompts: Prompts) -> list[dict]:
    model = model_name(base_url)
    rows, first = [], 0
    for clients in args.clients:
        print(f"[{name}] {clients} clients x {args.requests} requests ...", flush=True)
        row = asyncio.run(run_level(args, base_url, model, prompts, clients, first))
        first += clients * args.requests
        rows.append(row)
        print(f"[{name}] {clients} clients: {row['tok_s']:.1f} tok/s, {row['tokens']} tokens in {row['wall_s']:.1f}s, "
              f"{row['prompt_tokens']} prompt tokens, TTFT p50 {fmt(row['ttft50'], '.0f')} ms, ITL p50 {fmt(row['itl50'], '.1f')} ms",
              flush=True)
        if row["errors"]:
            print(f"[{name}] warning: {len(row['errors'])} of {row['requests']} requests failed, first: {row['errors'][0]}")
        if row["short"]:
            print(f"[{name}] warning: {row['short']} requests did not make exactly {args.max_tokens} tokens (EOS not ignored?)")
        if not row["usage"]:
            print(f"[{name}] note: no usage object in the stream; tokens counted as text events")
    return rows


# ---------------------------------------------------------------------------- preparing the weights


def prepare(args) -> None:
    """A jaxllm checkpoint -> the HF directory --checkpoint (jaxllm.hf.export_hf, context --context)
    -> one GGUF per dtype next to it, made by the llama.cpp tree's convert_hf_to_gguf.py."""
    sys.path.insert(0, str(ROOT))
    from jaxllm.checkpoint import load_any
    from jaxllm.hf import export_hf

    params, cfg, tokenizer, _ = load_any(Path(args.prepare))
    if tokenizer is None:
        sys.exit(f"{args.prepare}: no tokenizer; llama-server needs one in the GGUF")
    export_hf(args.checkpoint, params, cfg.replace(max_seq_len=args.context), tokenizer)
    print(f"wrote {args.checkpoint} (context {args.context})")
    convert = Path(args.llama_cpp) / "convert_hf_to_gguf.py"
    if not args.llama_cpp or not convert.exists():
        sys.exit("GGUFs not made: give --llama_cpp, a llama.cpp tree with convert_hf_to_gguf.py")
    for dtype, outtype in GGUF_TYPES.items():
        out = default_gguf(args.checkpoint, dtype)
        cmd = [sys.executable, str(convert), str(args.checkpoint), "--outtype", outtype, "--outfile", str(out)]
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        print(f"wrote {out}")


def default_gguf(checkpoint: Path, dtype: str) -> Path:
    return Path(checkpoint).parent / f"{Path(checkpoint).name.removesuffix('_hf')}-{GGUF_TYPES[dtype]}.gguf"


# ---------------------------------------------------------------------------- report


def fmt(x, spec=".1f"):
    return "-" if x is None else format(x, spec)


HEADER = ["clients", "requests", "tok/s", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms", "TPOT p50 ms", "TPOT p99 ms", "tok/event"]


def table(rows: list[dict], markdown: bool) -> str:
    cells = [[str(r["clients"]), str(r["requests"]) + (f" ({len(r['errors'])} failed)" if r["errors"] else ""), fmt(r["tok_s"]),
              fmt(r["ttft50"], ".0f"), fmt(r["ttft99"], ".0f"), fmt(r["itl50"]), fmt(r["itl99"]), fmt(r["tpot50"]),
              fmt(r["tpot99"]), fmt(r["tok_per_event"], ".2f")] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(HEADER) + " |", "|" + "|".join("---:" for _ in HEADER) + "|"]
        return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in cells])
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(HEADER)]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in [HEADER, *cells])


def ratios(results: dict[str, list[dict]]) -> list[str]:
    """The 16-vs-1-client scaling of each server and jaxllm / llama-server at equal clients."""
    lines = []
    by = {name: {r["clients"]: r["tok_s"] for r in rows} for name, rows in results.items()}
    for name, speed in by.items():
        if 1 in speed and 16 in speed:
            x = speed[16] / speed[1]
            verdict = f" (target >= {TARGETS['scaling']:.0f}x: {'ok' if x >= TARGETS['scaling'] else 'MISS'})" if name == "jaxllm" else ""
            lines.append(f"{name}: 16 clients / 1 client aggregate tok/s = {x:.2f}x{verdict}")
    if "jaxllm" in by and "llama-server" in by:
        common = [c for c in by["jaxllm"] if c in by["llama-server"]]
        parts = [f"{c} clients {by['jaxllm'][c] / by['llama-server'][c]:.2f}x" for c in common]
        if parts:
            verdict = ""
            if 16 in common:
                verdict = f" (target at 16 >= {TARGETS['vs_llama']:.0f}x: {'ok' if by['jaxllm'][16] >= by['llama-server'][16] else 'MISS'})"
            lines.append("jaxllm / llama-server tok/s: " + ", ".join(parts) + verdict)
    return lines


def llama_version(binary) -> str:
    try:
        out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30, check=False)
        lines = [l for l in (out.stdout + out.stderr).splitlines() if l.startswith("version")]
        return "llama-server " + (lines[0].split(":", 1)[1].strip() if lines else "?")
    except (OSError, subprocess.TimeoutExpired):
        return "llama-server ?"


def versions(args, servers: list[str]) -> str:
    parts = [f"Python {platform.python_version()}", f"httpx {httpx.__version__}"]
    if "jaxllm" in servers:
        run = lambda cmd: subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()
        commit = run(["git", "describe", "--always", "--dirty"])  # the server runs this tree
        jax = run([sys.executable, "-c", "import jax; print(jax.__version__)"])  # without importing JAX here
        parts.append(f"jaxllm {commit or '?'}, jax {jax or '?'}")
    if "llama-server" in servers:
        parts.append(llama_version(args.llama_server))
    return ", ".join(parts)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ---------------------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", default="1,4,16,64", help="concurrency levels, comma-separated")
    ap.add_argument("--requests", type=int, default=4, help="requests per client at each level")
    ap.add_argument("--max_tokens", type=int, default=128, help="output tokens of every request (EOS ignored)")
    ap.add_argument("--prompt_chars", default="64,768", help="prompt length range LO,HI in characters")
    ap.add_argument("--seed", type=int, default=0, help="seeds the prompts")
    ap.add_argument("--warmup", type=int, default=8, help="unmeasured requests before each level (at least one per client; 0: none)")
    ap.add_argument("--min_tokens", action="store_true", help="also send min_tokens = max_tokens")
    ap.add_argument("--dtype", default="float32", choices=list(GGUF_TYPES), help="float32, or int8 weights (jaxllm --quantize int8, q8_0 GGUF)")
    ap.add_argument("--slots", type=int, default=16, help="sequences in flight: jaxllm --slots, llama-server --parallel")
    ap.add_argument("--context", type=int, default=1024, help="tokens per slot (and the context --prepare exports)")
    ap.add_argument("--checkpoint", type=Path, default=WORK / "small_hf", help="what jaxllm serves: the HF directory the GGUF was made from")
    ap.add_argument("--gguf", type=Path, default=None, help="what llama-server serves (default: next to --checkpoint, by --dtype)")
    ap.add_argument("--llama_server", type=Path, default=os.environ.get("LLAMA_SERVER"), help="the llama-server binary ($LLAMA_SERVER)")
    ap.add_argument("--llama_threads", type=int, default=os.cpu_count())
    ap.add_argument("--llama_kv", default="f32", help="llama-server KV cache type (its own default is f16)")
    ap.add_argument("--llama_args", default="", help="more llama-server flags, space-separated")
    ap.add_argument("--jaxllm_args", default="", help="more `python -m jaxllm.serve` flags, space-separated")
    ap.add_argument("--skip_llama", action="store_true")
    ap.add_argument("--skip_jaxllm", action="store_true")
    ap.add_argument("--base_url", default="", help="benchmark only this running server (e.g. http://127.0.0.1:8000)")
    ap.add_argument("--start_timeout", type=float, default=900, help="seconds to wait for a server's /health")
    ap.add_argument("--request_timeout", type=float, default=900)
    ap.add_argument("--prepare", default="", metavar="CKPT", help="export this jaxllm checkpoint to --checkpoint, convert to GGUFs, exit")
    ap.add_argument("--llama_cpp", default="", help="with --prepare: the llama.cpp source tree (holds convert_hf_to_gguf.py)")
    ap.add_argument("--out", default="", help="append the tables, with machine, versions and date, to this markdown file")
    ap.add_argument("--note", default="", help="a line about the run conditions, kept with the results")
    args = ap.parse_args()
    if args.prepare:
        return prepare(args)
    args.clients = [int(c) for c in args.clients.split(",")]
    lo, hi = map(int, args.prompt_chars.split(","))
    args.gguf = args.gguf or default_gguf(args.checkpoint, args.dtype)

    plan = []  # (name, Server or None); None: --base_url
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    if args.base_url:
        plan.append((args.base_url, None))
    else:
        if not args.skip_jaxllm:
            port = free_port()
            plan.append(("jaxllm", Server("jaxllm", jaxllm_command(args, port), port, WORK / "logs" / f"jaxllm-{args.dtype}-{stamp}.log",
                                          args.start_timeout)))
        if not args.skip_llama:
            if not args.llama_server or not Path(args.llama_server).exists():
                sys.exit("give --llama_server (or $LLAMA_SERVER), the llama-server binary, or --skip_llama")
            if not args.gguf.exists():
                sys.exit(f"{args.gguf} not found: make it with --prepare, or give --gguf")
            port = free_port()
            plan.append(("llama-server", Server("llama-server", llama_command(args, port), port,
                                                WORK / "logs" / f"llama-{args.dtype}-{stamp}.log", args.start_timeout)))
    if not plan:
        sys.exit("nothing to benchmark: --skip_jaxllm and --skip_llama both given")

    machine = f"{platform.platform()}, {cpu_name()}, {os.cpu_count()} CPUs"
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    prompts = Prompts(lo, hi, args.seed)
    load = os.getloadavg()[0]
    print(f"{when} · {machine}\n{args.dtype}, {args.slots} slots, clients {args.clients} x {args.requests} requests, "
          f"{args.max_tokens} tokens each, prompts {lo}-{hi} characters, seed {args.seed}; load average {load:.1f}")
    if load > 0.5:
        print(f"warning: 1-min load average is {load:.1f}: other processes share the CPUs, so timings will be noisy")
    results = {}
    for name, server in plan:
        if server is None:
            results[name] = bench(args, name, name, prompts)
            continue
        with server:
            results[name] = bench(args, name, server.base_url, prompts)

    what = (f"{args.dtype}, {args.slots} slots; each client {args.requests} requests of {args.max_tokens} tokens (EOS ignored), "
            f"greedy, streamed; prompts {lo}-{hi} characters of stdlib source, seed {args.seed}")
    shown = lambda cmd: " ".join(cmd[1:]).replace(" --port 0", "").replace(f"{ROOT}/", "")  # less the port and this tree's path
    setup = []
    if "jaxllm" in results:
        setup.append(f"jaxllm: `python {shown(jaxllm_command(args, 0))}`")
    if "llama-server" in results:
        setup.append(f"llama-server: `llama-server {shown(llama_command(args, 0))}`")
    summary = ratios(results)
    meta = (f"{when} · {machine} · {versions(args, list(results))} · load average {load:.1f} before, {os.getloadavg()[0]:.1f} after"
            + (f" · {args.note}" if args.note else ""))
    print(f"\n{meta}\n{what}")
    for name, rows in results.items():
        print(f"\n{name}:\n{table(rows, markdown=False)}")
    print("\n" + "\n".join(summary) if summary else "")
    if args.out:
        parts = [meta, what + ".", *setup]
        for name, rows in results.items():
            parts.append(f"**{name}**\n\n{table(rows, markdown=True)}")
        parts += summary
        with open(args.out, "a") as f:
            f.write(f"\n### Serving, {args.dtype}, {when}\n\n" + "\n\n".join(parts) + "\n")
        print(f"\nappended to {args.out}")


if __name__ == "__main__":
    main()
