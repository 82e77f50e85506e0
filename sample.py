"""Sample from a jaxllm checkpoint: parse the flags → a `jaxllm.request.Request` → run it → print.

    python sample.py --prompt "def fibonacci(n):" --max_new_tokens 64 --temperature 0.8 --seed 0
    python sample.py --checkpoint out/run1 --prompt "a" --prompt "b" --top_p 0.9 --format jsonl
    python sample.py --chat --system "You are terse." --prompt "Name a prime." --stream
    python sample.py --prompt "A user record:" --json_schema user.json --format jsonl
    python sample.py --quantize int4 --group_size 64 --warmup --verbose --prompt "import os"

The generation flags are the fields of `Request`, with the same names and defaults (hyphenated
aliases work too); the few flags that are not (where the model comes from, how it is loaded,
how output is printed) are listed in `parse_args`. Without --checkpoint, the model bundled with
the package is used. Bad input exits with code 2 and one line naming the problem (both sides
of a conflict: "--length_penalty applies only with --num_beams > 1").
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from jaxllm import request as requests
from jaxllm.cli import Parser, fail
from jaxllm.errors import GenerationError, JaxllmError

from jaxllm.loading import DEFAULT_CHECKPOINT
ATTENTION_IMPLS = ("auto", "reference", "xla", "cudnn", "pallas")  # jaxllm.config.ATTENTION_IMPLS


def flag_names(args):
    """How main's errors name a request field: as its flag, where it has one, and --json_schema
    with the file it was read from (`--json_schema user.json`)."""
    has_flag = {f.name: f.metadata["flag"] for f in requests.fields()}

    def name(field: str) -> str:
        if not has_flag.get(field, True):
            return field
        return f"--{field} {args.json_schema}" if field == "json_schema" and hasattr(args, "json_schema") else f"--{field}"

    return name


class Renamed(argparse.Action):
    """An old flag: refused with the new name (not a silent alias, so scripts learn the one name)."""

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"argument {option_string}: renamed --{self.const}")


def _flag(p, name, **kw):
    names = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
    p.add_argument(*names, dest=name, **kw)


def _ids(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def _logit_bias(item: str) -> dict[int, float]:
    try:
        pairs = json.loads(item).items() if item.lstrip().startswith("{") else [item.replace(":", "=").split("=", 1)]
        return {int(tok): float(b) for tok, b in pairs}
    except (ValueError, TypeError, AttributeError):
        raise argparse.ArgumentTypeError(f"expected ID=BIAS or a JSON object, got {item!r}") from None


_ids.__name__, _logit_bias.__name__ = "comma-separated ids", "ID=BIAS"  # argparse names a type in its errors

# How a field's flag reads its value, where the default's type does not say (None defaults, files, lists).
READ = {
    "num_return_sequences": dict(type=int),
    "logit_bias": dict(type=_logit_bias, action="append"),
    "allowed_token_ids": dict(type=_ids),
    "seed": dict(type=int),
    "eos_token_id": dict(type=int, action="append"),
    "logprobs": dict(type=int, nargs="?", const=0),
    "json_schema": dict(metavar="FILE"),
    "max_json_depth": dict(type=int),
    "length_penalty": dict(type=float),
    "early_stopping": dict(choices=["true", "false", "never"]),
    "draft": dict(metavar="DIR"),
    "regex": dict(),
    "system": dict(),
    "num_speculative_tokens": dict(type=int),
    "prompt_lookup_max": dict(type=int, metavar="N"),
    "kv_cache_dtype": dict(choices=["int8"]),
    "chat": dict(nargs="?", const="auto", choices=["auto", "jaxllm", "llama2", "plain", "model"]),
    "few_shot": dict(metavar="FILE.jsonl"),
}
CLI_ONLY = ("checkpoint", "prompt", "prompt_file", "format", "quantize", "group_size", "attention_impl", "warmup",
            "verbose", "no_compile_cache")


def parser() -> Parser:
    """The flags: one per request field (same name, same default) and the few that are not request fields."""
    p = Parser(prog="sample.py", description="Generate text from a jaxllm checkpoint.", argument_default=argparse.SUPPRESS)
    for f in requests.fields():
        if not f.metadata["flag"]:
            continue
        read = READ[f.name] if f.name in READ else (
            dict(action="store_true") if isinstance(f.default, bool) else dict(action="append") if f.default == ()
            else dict(type=type(f.default))
        )
        shown = "" if f.default in (None, ()) or isinstance(f.default, bool) else f" (default: {f.default})"
        _flag(p, f.name, help=f.metadata["help"] + shown, **read)
    p.add_argument("--n", dest="num_return_sequences", type=int, help="--num_return_sequences")
    for old, new in (("kv_cache", "kv_cache_dtype"), ("draft_checkpoint", "draft")):
        _flag(p, old, action=Renamed, const=new, nargs="?", help=argparse.SUPPRESS)
    # not request fields: the model, how it is loaded, and how output is printed
    _flag(p, "checkpoint", help="a jaxllm checkpoint or a Hugging Face directory (Llama, Mistral, Qwen2, Gemma) (default: the bundled model)")
    _flag(p, "prompt", action="append", help="prompt text; repeat for a batch")
    _flag(p, "prompt_file", action="append", help="a file whose whole text is one prompt; repeatable")
    _flag(p, "format", choices=["text", "jsonl"], help="text (default) or one JSON record per output")
    _flag(p, "quantize", choices=["int8", "int4"], help="weight-only quantization after loading (target and draft)")
    _flag(p, "group_size", type=int, help="--quantize int4: input features per scale (32, 64 or 128; default 64)")
    _flag(p, "attention_impl", choices=ATTENTION_IMPLS, help="attention backend of target and draft (default: the model's)")
    _flag(p, "warmup", action="store_true", help="compile every prompt-length bucket up to the context first")
    _flag(p, "no_compile_cache", action="store_true", help="do not keep compiled programs on disk")
    _flag(p, "verbose", action="store_true", help="report on stderr the params' layout and which matmul runs for which weights, which attention backend runs and why, then compilations, persistent-cache hits and compile time")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """Flags -> a namespace holding only the request fields given (so a default stays the request's)."""
    p = parser()
    args = p.parse_args(argv)
    for name, default in (("format", "text"), ("prompt", []), ("prompt_file", []), ("warmup", False), ("verbose", False),
                          ("no_compile_cache", False), ("checkpoint", None), ("quantize", None), ("attention_impl", None)):
        setattr(args, name, getattr(args, name, default))
    # the rules of the flags that are not request fields (the request's own rules are in request.check_mode)
    if hasattr(args, "group_size"):
        if args.quantize != "int4":
            p.error("argument --group_size: applies only with --quantize int4" + (f" (got --quantize {args.quantize})" if args.quantize else ""))
        if args.group_size not in (32, 64, 128):
            p.error(f"argument --group_size: must be 32, 64 or 128, got {args.group_size}")
    if getattr(args, "stream", False) and (len(args.prompt) + len(args.prompt_file) > 1 or args.format != "text"
                                           or getattr(args, "num_return_sequences", 1) > 1):
        p.error("argument --stream: prints one output as text: one prompt, --num_return_sequences 1, --format text")
    return args


def read_request(args, model_defaults: dict | None = None, draft=None) -> requests.Request:
    """The request the flags ask for (files read), completed by the model's own defaults for the
    flags not given; `draft` replaces --draft's path once that model is loaded."""
    from jaxllm import chat

    prompts = list(args.prompt)
    for f in args.prompt_file:
        prompts.append(_read(f, "prompt_file"))
    given = {f.name: getattr(args, f.name) for f in requests.fields() if hasattr(args, f.name)}
    if "logit_bias" in given:
        given["logit_bias"] = {k: v for d in given["logit_bias"] for k, v in d.items()}
    if "early_stopping" in given:
        given["early_stopping"] = {"true": True, "false": False}.get(given["early_stopping"], "never")
    if "json_schema" in given:
        given["json_schema"] = _read(given["json_schema"], "json_schema")
    if "few_shot" in given:
        given["few_shot"] = chat.load_few_shot(given["few_shot"])
    if draft is not None:
        given["draft"] = draft
    options, taken = requests.with_model_defaults(given, model_defaults or {})
    if taken:
        shown = ", ".join(f"{k}={options[k]}" for k in taken)
        print(f"sample.py: defaults from {_checkpoint(args) / 'generation_config.json'}: {shown}", file=sys.stderr)
    return requests.Request(prompts or [""], **options)


def _read(path: str, flag: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise GenerationError(f"argument --{flag}: cannot read {path} ({getattr(e, 'strerror', None) or e})") from None


def _checkpoint(args) -> Path:
    return Path(args.checkpoint) if args.checkpoint else DEFAULT_CHECKPOINT


def main(argv=None) -> int:
    args = parse_args(argv)
    import jaxllm
    from jaxllm.compilation import CompileCounter, enable_persistent_cache

    try:
        request = read_request(args)  # a conflict between flags is refused before any model is loaded
        if args.warmup and request.mode != requests.SAMPLE:
            mode = ("--num_beams > 1" if request.mode == requests.BEAM else
                    "--draft" if request.draft is not None else "--prompt_lookup_max")
            raise GenerationError(f"--warmup compiles the sampling path only: it does not work with {mode}")
        if not args.no_compile_cache:
            try:
                enable_persistent_cache()
            except jaxllm.CacheError as e:  # a cache others can write could hand XLA their code: go without
                print(f"sample.py: warning: {e}; running without the persistent compilation cache", file=sys.stderr)
        counter = CompileCounter().__enter__()  # --verbose reports what this process compiled
        params, cfg, tokenizer, model_defaults = load_model(_checkpoint(args), args, "checkpoint")
        draft = None
        if request.draft is not None:
            dparams, dcfg, dtok, _ = load_model(Path(request.draft), args, "draft")
            if dtok is not None and dtok.fingerprint != tokenizer.fingerprint:
                raise jaxllm.CheckpointError(f"argument --draft: {request.draft} has a different tokenizer")
            draft = requests.Draft(dparams, dcfg)
        request = read_request(args, model_defaults, draft)
        result = run(params, cfg, tokenizer, request, args)
    except requests.RequestError as e:
        return fail("sample.py", e.render(flag_names(args)))
    except JaxllmError as e:
        return fail("sample.py", str(e))
    print_result(result, request, tokenizer, args.format)
    _report(counter, args, result.timing)
    return 0


def load_model(path: Path, args, flag: str):
    """A checkpoint -> (params, cfg, tokenizer, generation defaults), quantized and with the
    attention backend the flags ask for, laid out for decoding (target and draft alike)."""
    import jaxllm
    from jaxllm import devices
    from jaxllm.loading import load_model as load

    if flag == "checkpoint" and args.checkpoint is None and not path.exists():
        raise jaxllm.CheckpointError(f"no --checkpoint given and the bundled model is missing ({path})")
    params, cfg, tokenizer, model_defaults = load(path, quantize=args.quantize, group_size=getattr(args, "group_size", 64),
                                                  attention_impl=args.attention_impl, flag=flag)
    if args.verbose:
        from jaxllm.attention import describe

        print(f"sample.py: {devices.describe(params, cfg)}", file=sys.stderr)
        print(f"sample.py: {describe(cfg.attention_impl, cfg.compute_dtype, cfg.dim_per_head, sinks=getattr(args, 'sinks', 0) > 0)}",
              file=sys.stderr)
    if flag == "checkpoint" and tokenizer is None:
        raise jaxllm.CheckpointError(f"{path} has no tokenizer (tokenizer.model or tokenizer.json), so text prompts cannot be encoded")
    return params, cfg, tokenizer, model_defaults


def run(params, cfg, tokenizer, request: requests.Request, args):
    """Runs the request with the decoder its mode names; --stream prints as it goes. -> GenerationResult"""
    import jaxllm

    if args.warmup:
        from jaxllm.warmup import warmup

        same = {k: v for k, v in request.options().items() if k not in ("max_new_tokens", "retries", "stream")}
        done = warmup(params, cfg, batch_size=len(request.prompts), max_new_tokens=request.max_new_tokens,
                      tokenizer=tokenizer, **same)
        if args.verbose:
            print(f"sample.py: warmup: {len(done['prompt_lengths'])} prompt buckets (prompt lengths "
                  f"{done['prompt_lengths']}), {done['programs']} programs ({done['cache_hits']} from the "
                  f"persistent cache) in {done['compile_s']:.2f}s", file=sys.stderr)
    if request.stream:  # sampling or speculative decoding
        pieces = jaxllm.generate_stream(params, cfg, request, tokenizer=tokenizer)
        print(request.prompts[0], end="", flush=True)
        for row, piece in pieces:
            if row >= 0:
                print(piece, end="", flush=True)
            else:
                result = piece
        print()
        return result
    if request.mode == requests.SPECULATIVE:
        result = jaxllm.generate(params, cfg, request, tokenizer=tokenizer)
        print(f"sample.py: speculative decoding accepted {result.timing['acceptance_rate']:.0%} of drafted tokens, "
              f"{result.timing['tokens_per_block']:.2f} tokens per target forward", file=sys.stderr)
        return result
    if request.mode == requests.BEAM:
        from jaxllm.beam import beam_generate

        return beam_generate(params, cfg, request, tokenizer=tokenizer)
    return jaxllm.generate(params, cfg, request, tokenizer=tokenizer)


def _report(counter, args, timing=None) -> None:
    """--verbose: compilations in this process (and how many came from the persistent cache)."""
    counter.__exit__(None, None, None)
    if args.verbose:
        extra = f"; generate's compile_s {timing['compile_s']:.2f}s" if timing and "compile_s" in timing else ""
        print(f"sample.py: {counter.count} programs compiled or loaded, {counter.cache_hits} of them "
              f"from the persistent cache ({counter.new} new XLA compilations), {counter.seconds:.2f}s{extra}", file=sys.stderr)


def print_result(result, request: requests.Request, tokenizer, fmt: str) -> None:
    n = request.num_return_sequences
    for i, (ids, text, why) in enumerate(zip(result.token_ids, result.texts, result.finish_reasons)):
        prompt = request.prompts[result.prompt_index[i]]
        if fmt == "jsonl":
            record = {
                "prompt": prompt, "text": text, "token_ids": ids, "finish_reason": why,
                "num_prompt_tokens": result.num_prompt_tokens[i], "num_generated_tokens": len(ids),
                "timing": {k: round(v, 6) for k, v in result.timing.items()},
            }
            if n > 1:
                record["index"] = i % n
            if result.scores is not None:
                record["score"] = result.scores[i]
            if result.valid is not None:
                record["valid"] = result.valid[i]
                if not result.valid[i]:
                    record["error"] = result.errors[i]
            if result.logprobs is not None:
                record["logprobs"] = result.logprobs[i]
            if result.top_logprobs is not None:
                record["top_logprobs"] = [{str(k): v for k, v in d.items()} for d in result.top_logprobs[i]]
            print(json.dumps(record, ensure_ascii=False))
            continue
        if not request.stream:  # streamed, the text is out already (what follows it is not)
            print(("\n" + "-" * 40 + "\n" if i else "") + prompt + text)
        if result.logprobs is not None:
            print(logprob_table(ids, result.logprobs[i], result.top_logprobs[i] if result.top_logprobs else None, tokenizer))
        if result.valid is not None and not result.valid[i]:
            print(f"sample.py: output {i} is not valid: {result.errors[i]}", file=sys.stderr)


def logprob_table(ids, logprobs, alternatives, tokenizer) -> str:
    """--logprobs in text output: a header, then one line per token: its text (quoted, so spaces and
    line breaks show), its log-probability, and the alternatives asked for."""
    piece = lambda t: json.dumps(tokenizer.decode([t]), ensure_ascii=False)
    lines = [f"[logprobs] {len(ids)} tokens, sum {sum(logprobs):.4f}"]
    for step, (t, lp) in enumerate(zip(ids, logprobs)):
        line = f"{step:4d}  {piece(t):<16} {lp:9.4f}"
        if alternatives:
            line += "   " + ", ".join(f"{piece(a)} {v:.4f}" for a, v in alternatives[step].items())
        lines.append(line)
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
