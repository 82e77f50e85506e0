"""python -m jaxllm.serve: an OpenAI-compatible HTTP server over one model.

    python -m jaxllm.serve                                  # the bundled model on 127.0.0.1:8000
    python -m jaxllm.serve --checkpoint out/run1 --slots 16 --quantize int8 --port 8080
    JAXLLM_API_KEY=secret python -m jaxllm.serve --host 0.0.0.0

Bad flags, a checkpoint that does not load or a port that is taken exit with code 2 and one
line. SIGTERM (or Ctrl-C) stops taking requests, lets running ones finish for up to --grace
seconds, cancels the rest and exits.
"""

from __future__ import annotations

import os
import signal
import socket
import sys

from jaxllm.cli import Parser, fail
from jaxllm.config import ATTENTION_IMPLS  # config.py and loading.py import no JAX: flags are refused at once
from jaxllm.loading import QUANTIZE

PROG = "python -m jaxllm.serve"


def parser() -> Parser:
    p = Parser(prog=PROG, description="Serve a jaxllm model over OpenAI's HTTP API.")
    p.add_argument("--checkpoint", help="a jaxllm checkpoint or a Hugging Face directory (Llama, Mistral, Qwen2, Gemma) (default: the bundled model)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 picks a free one)")
    p.add_argument("--model_name", help="the model's name in the API (default: the checkpoint's folder name)")
    p.add_argument("--api_key", help="require 'Authorization: Bearer KEY' on /v1/* (default: $JAXLLM_API_KEY, else none)")
    p.add_argument("--slots", type=int, default=8, help="requests decoded together (default: 8)")
    p.add_argument("--chunk", type=int, default=8, help="decode steps between joins, leaves and streamed text (default: 8)")
    p.add_argument("--context", type=int, help="tokens per slot, prompt and output (default: the model's context)")
    p.add_argument("--max_queue", type=int, default=256, help="requests waiting for a slot before 503 (default: 256)")
    p.add_argument("--max_n", type=int, default=4, help="most choices per request, n (default: 4)")
    p.add_argument("--max_logprobs", type=int, default=5, help="most alternatives per token (default: 5)")
    p.add_argument("--max_body_bytes", type=int, default=1 << 20, help="largest request body (default: 1 MiB)")
    p.add_argument("--grace", type=float, default=10.0, help="seconds running requests may finish after SIGTERM (default: 10)")
    p.add_argument("--quantize", choices=QUANTIZE, help="weight-only quantization after loading")
    p.add_argument("--group_size", type=int, default=64, help="--quantize int4: input features per scale (default: 64)")
    p.add_argument("--kv_cache_dtype", "--kv_cache", choices=["int8"], help="int8: quantized KV cache")
    p.add_argument("--compute_dtype", choices=["float32", "bfloat16", "float16"], help="compute dtype (default: the model's)")
    p.add_argument("--attention_impl", choices=ATTENTION_IMPLS, help="attention backend")
    p.add_argument("--warmup", action="store_true", help="compile every program serving needs before taking requests")
    p.add_argument("--no_compile_cache", action="store_true", help="do not keep compiled programs on disk")
    p.add_argument("--log_level", default="warning", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (default: warning)")
    return p


def check(args) -> str | None:
    """A flag out of range -> its one-line complaint."""
    positive = ("slots", "chunk", "max_queue", "max_n", "max_body_bytes")
    for name in positive:
        if getattr(args, name) < 1:
            return f"argument --{name}: must be >= 1, got {getattr(args, name)}"
    if not 0 <= args.port <= 65535:
        return f"argument --port: must be in [0, 65535], got {args.port}"
    if not 0 <= args.max_logprobs <= 20:
        return f"argument --max_logprobs: must be in [0, 20], got {args.max_logprobs}"
    if args.context is not None and args.context < 2:
        return f"argument --context: must be >= 2, got {args.context}"
    if args.group_size != 64 and args.quantize != "int4":
        return "argument --group_size: applies only with --quantize int4"
    if args.grace < 0:
        return f"argument --grace: must be >= 0, got {args.grace}"
    return None


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    problem = check(args)
    if problem:
        return fail(PROG, problem)
    try:
        sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((args.host, args.port))
    except (OSError, OverflowError) as e:
        return fail(PROG, f"cannot listen on {args.host}:{args.port}: {getattr(e, 'strerror', None) or e}")

    import uvicorn

    from jaxllm.compilation import enable_persistent_cache
    from jaxllm.errors import CacheError, JaxllmError
    from jaxllm.loading import DEFAULT_CHECKPOINT, load_model
    from jaxllm.serve.app import create_app
    from jaxllm.serve.engine import Engine, EngineError

    if not args.no_compile_cache:
        try:
            enable_persistent_cache()
        except CacheError as e:
            print(f"{PROG}: warning: {e}; running without the persistent compilation cache", file=sys.stderr)
    try:
        params, cfg, tokenizer, _ = load_model(args.checkpoint, quantize=args.quantize, group_size=args.group_size,
                                               attention_impl=args.attention_impl, compute_dtype=args.compute_dtype)
        engine = Engine(params, cfg, tokenizer, slots=args.slots, context=args.context, chunk=args.chunk,
                        max_queue=args.max_queue, max_logprobs=args.max_logprobs,
                        kv_cache_dtype=args.kv_cache_dtype or "")
    except (JaxllmError, EngineError) as e:
        return fail(PROG, str(e))
    if args.warmup:
        done = engine.warmup()
        print(f"{PROG}: warmup: {done['programs']} programs in {done['seconds']:.1f}s", file=sys.stderr, flush=True)
    name = args.model_name or (os.path.basename(os.path.normpath(args.checkpoint)) if args.checkpoint else
                               f"jaxllm-{DEFAULT_CHECKPOINT.name}")
    api_key = args.api_key or os.environ.get("JAXLLM_API_KEY") or None
    app = create_app(engine, model_name=name, api_key=api_key, max_body_bytes=args.max_body_bytes, max_n=args.max_n,
                     grace_s=args.grace)
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=args.grace + 1)
    server = uvicorn.Server(config)
    shown = f"[{host}]" if ":" in host else host
    print(f"{PROG}: serving {name} on http://{shown}:{port} ({args.slots} slots, context {engine.context})",
          file=sys.stderr, flush=True)
    # uvicorn handles SIGTERM/SIGINT while it runs, then raises the signal again for the handler
    # it found: these make that a clean exit (0) rather than death by signal or a traceback.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
