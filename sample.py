"""Sample from a jaxllm checkpoint.

    python sample.py --prompt "def fibonacci(n):" --max_new_tokens 64 --temperature 0.8 --seed 0
    python sample.py --checkpoint out/run1 --prompt "a" --prompt "b" --top_p 0.9 --format jsonl
    python sample.py --chat --system "You are terse." --prompt "Name a prime." --stream
    python sample.py --prompt "A user record:" --json_schema user.json --format jsonl
    python sample.py --quantize int4 --group_size 64 --warmup --verbose --prompt "import os"

Flags are named as in docs/GENERATION.md (hyphenated aliases work too). Without
--checkpoint, the model bundled with the package is used. Bad input exits with code 2 and
one line naming the problem.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "jaxllm" / "assets" / "default"


def one_line(message: str) -> str:
    """Errors are one line: a line break inside one (from a path, flag or key the user wrote) is shown escaped."""
    return message.replace("\r", "\\r").replace("\n", "\\n")


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, instead of usage + message
        self.exit(2, f"{self.prog}: error: {one_line(message)}\n")


def _flag(p, name, **kw):
    names = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
    p.add_argument(*names, dest=name, **kw)


# Built-in defaults of the flags a Hugging Face generation_config.json may set instead.
DEFAULTS = dict(max_new_tokens=64, temperature=0.8, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0, no_repeat_ngram_size=0)
# flag -> (test, what is allowed); checked once, at the boundary
RANGES = {
    "max_new_tokens": (lambda v: v >= 1, ">= 1"),
    "min_new_tokens": (lambda v: v >= 0, ">= 0"),
    "temperature": (lambda v: v >= 0, ">= 0 (0 = greedy)"),
    "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "min_p": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "repetition_penalty": (lambda v: v > 0, "> 0 (1 = off)"),
    "presence_penalty": (math.isfinite, "a finite number"),
    "frequency_penalty": (math.isfinite, "a finite number"),
    "no_repeat_ngram_size": (lambda v: 0 <= v <= 16, "in [0, 16]"),
    "seed": (lambda v: v is None or v >= 0, ">= 0"),
    "num_return_sequences": (lambda v: v >= 1, ">= 1"),
    "logprobs": (lambda v: v is None or 0 <= v <= 20, "in [0, 20]"),
    "stop_on_repetition": (lambda v: v == 0 or v >= 2, "0 (off) or >= 2"),
    "num_beams": (lambda v: v >= 1, ">= 1"),
    "num_speculative_tokens": (lambda v: 1 <= v <= 16, "in [1, 16]"),
    "length_penalty": (math.isfinite, "a finite number"),
    "retries": (lambda v: 0 <= v <= 100, "in [0, 100]"),
    "max_json_depth": (lambda v: 1 <= v <= 30, "in [1, 30]"),
    "window": (lambda v: v >= 0, ">= 0 (0 = the model's own)"),
    "sinks": (lambda v: v >= 0, ">= 0"),
    "prefill_chunk": (lambda v: v >= 0, ">= 0 (0 = the whole prompt at once)"),
    "group_size": (lambda v: v in (32, 64, 128), "32, 64 or 128"),
}
ATTENTION_IMPLS = ("auto", "reference", "xla", "cudnn", "pallas")  # jaxllm.config.ATTENTION_IMPLS, without importing jax


def parse_args(argv=None) -> argparse.Namespace:
    p = Parser(prog="sample.py", description="Generate text from a jaxllm checkpoint.")
    _flag(p, "checkpoint", default=None, help="a jaxllm checkpoint or a Hugging Face Llama-family directory (default: the bundled model)")
    _flag(p, "prompt", action="append", default=[], help="prompt text; repeat for a batch")
    _flag(p, "prompt_file", action="append", default=[], help="a file whose whole text is one prompt; repeatable")
    _flag(p, "max_new_tokens", type=int, default=None, help="tokens to generate (>= 1)")
    _flag(p, "min_new_tokens", type=int, default=0, help="EOS is masked until this many tokens")
    _flag(p, "temperature", type=float, default=None, help="0 = greedy")
    _flag(p, "top_k", type=int, default=None, help="keep the k most likely tokens (<= 0: off)")
    _flag(p, "top_p", type=float, default=None, help="nucleus sampling mass in (0, 1]")
    _flag(p, "min_p", type=float, default=None, help="keep tokens with p >= min_p * p_max")
    _flag(p, "repetition_penalty", type=float, default=None, help="> 0; 1 is off")
    _flag(p, "presence_penalty", type=float, default=0.0)
    _flag(p, "frequency_penalty", type=float, default=0.0)
    _flag(p, "no_repeat_ngram_size", type=int, default=None, help="never repeat an n-gram of this size")
    _flag(p, "bad_words", action="append", default=[], help="a string never to generate; repeatable")
    _flag(p, "logit_bias", action="append", default=[], help="ID=BIAS, repeatable, or a JSON object")
    _flag(p, "allowed_token_ids", default=None, help="comma-separated ids: only these may be generated")
    _flag(p, "stop", action="append", default=[], help="stop string; repeatable")
    _flag(p, "include_stop_str_in_output", action="store_true")
    _flag(p, "eos_token_id", type=int, action="append", default=None, help="EOS id(s) (default: the tokenizer's)")
    _flag(p, "stop_on_repetition", type=int, default=0, help="end a row repeating one n-gram this many times")
    _flag(p, "seed", type=int, default=None, help="PRNG seed (default: random)")
    p.add_argument("--num_return_sequences", "--num-return-sequences", "--n", dest="num_return_sequences", type=int, default=1)
    _flag(p, "logprobs", type=int, nargs="?", const=0, default=None, help="report log-probabilities (and N alternatives)")
    _flag(p, "draft_checkpoint", default=None, help="speculative decoding: a smaller model sharing the tokenizer")
    _flag(p, "num_speculative_tokens", type=int, default=4, help="tokens the draft proposes per target forward")
    _flag(p, "num_beams", type=int, default=1, help="beam search with K beams (1: sample / greedy)")
    _flag(p, "length_penalty", type=float, default=1.0, help="beam score = sum log-prob / length ** length_penalty")
    _flag(p, "early_stopping", choices=["true", "false", "never"], default="false", help="when beam search stops")
    _flag(p, "json", action="store_true", help="output a JSON object (enforced while decoding)")
    _flag(p, "json_schema", default=None, help="a JSON Schema file the output must satisfy")
    _flag(p, "regex", default=None, help="a regex the whole output must match")
    _flag(p, "choice", action="append", default=[], help="the output is exactly one of these strings; repeatable")
    _flag(p, "max_json_depth", type=int, default=16, help="--json: deepest nesting allowed")
    _flag(p, "verify_only", action="store_true", help="do not enforce the constraint; only check the outputs")
    _flag(p, "retries", type=int, default=0, help="sample rows whose output is not valid again, up to N times")
    _flag(p, "window", type=int, default=0, help="keep only the last W tokens in a ring cache; generation may run past the context")
    _flag(p, "sinks", type=int, default=0, help="of the window, keep the first S tokens for good (attention sinks; S < W)")
    _flag(p, "prefill_chunk", type=int, default=512, help="feed the prompt this many tokens at a time (0 = all at once)")
    _flag(p, "kv_cache", choices=["int8"], default=None, help="int8: quantized KV cache (a scale per token and head)")
    _flag(p, "attention_impl", choices=ATTENTION_IMPLS, default=None, help="attention backend (default: the model's, usually auto)")
    _flag(p, "stream", action="store_true", help="print text as it is generated")
    _flag(p, "system", default=None, help="system prompt (implies --chat)")
    _flag(p, "few_shot", default=None, help="JSONL file of examples, e.g. {\"input\": ..., \"output\": ...} (implies --chat)")
    _flag(p, "chat", nargs="?", const="auto", default=None, choices=["auto", "jaxllm", "llama2", "plain"], help="wrap prompts in a chat template")
    _flag(p, "format", choices=["text", "jsonl"], default="text")
    _flag(p, "no_compile_cache", action="store_true", help="do not keep compiled programs on disk")
    _flag(p, "quantize", choices=["int8", "int4"], default=None, help="weight-only quantization after loading")
    _flag(p, "group_size", type=int, default=64, help="int4: input features per scale (32, 64 or 128)")
    _flag(p, "warmup", action="store_true", help="compile every prompt-length bucket up to the context first")
    _flag(p, "verbose", action="store_true", help="report on stderr the params' layout and which matmul runs for which weights, which attention backend runs and why, then compilations, persistent-cache hits and compile time")
    args = p.parse_args(argv)
    for name, (ok, allowed) in RANGES.items():
        value = getattr(args, name)
        if value is None and name in DEFAULTS:
            continue
        if not ok(value) or (isinstance(value, float) and math.isnan(value)):
            p.error(f"argument --{name}: must be {allowed}, got {value}")
    try:
        args.logit_bias = _parse_logit_bias(args.logit_bias)
        args.allowed_token_ids = [int(x) for x in args.allowed_token_ids.split(",")] if args.allowed_token_ids else None
    except ValueError as e:
        p.error(str(e))
    if args.sinks and args.sinks >= args.window:
        p.error(f"argument --sinks: needs a --window larger than it (got --sinks {args.sinks}, --window {args.window})")
    if args.draft_checkpoint and args.num_beams > 1:
        p.error("argument --draft_checkpoint: speculative decoding does not combine with --num_beams")
    if args.num_beams > 1:
        if args.num_return_sequences > args.num_beams:
            p.error(f"argument --num_return_sequences: must be <= --num_beams ({args.num_beams}) with beam search")
        for name in ("temperature", "top_k", "top_p", "min_p", "logprobs"):
            if getattr(args, name) is not None:
                p.error(f"argument --{name}: does not apply to beam search (--num_beams {args.num_beams})")
        if args.stream or args.presence_penalty or args.frequency_penalty or args.stop_on_repetition:
            p.error("argument --num_beams: beam search does not stream or take presence/frequency/repetition-stop settings")
    chosen = [f for f in ("json", "json_schema", "regex", "choice") if getattr(args, f)]
    if len(chosen) > 1:
        p.error(f"arguments --{chosen[0]} and --{chosen[1]}: choose one constraint")
    if (args.verify_only or args.retries) and not chosen:
        p.error("arguments --verify_only / --retries: need a constraint (--json, --json_schema, --regex or --choice)")
    if (args.retries or args.verify_only) and (args.stream or args.num_beams > 1 or args.draft_checkpoint):
        p.error("arguments --verify_only / --retries: do not combine with --stream, --num_beams or --draft_checkpoint")
    if args.warmup and (args.num_beams > 1 or args.draft_checkpoint):
        p.error("argument --warmup: compiles the sampling path only; it does not combine with --num_beams or --draft_checkpoint")
    if args.stream and (len(args.prompt) + len(args.prompt_file) > 1 or args.num_return_sequences > 1 or args.format != "text"):
        p.error("argument --stream: works with one prompt, --num_return_sequences 1 and --format text")
    return args


def _parse_logit_bias(items: list[str]) -> dict[int, float]:
    bias: dict[int, float] = {}
    for item in items:
        try:
            pairs = json.loads(item).items() if item.lstrip().startswith("{") else [item.replace(":", "=").split("=", 1)]
            for tok, b in pairs:
                bias[int(tok)] = float(b)
        except (ValueError, TypeError, AttributeError):
            raise ValueError(f"argument --logit_bias: expected ID=BIAS or a JSON object, got {item!r}") from None
    return bias


def _constraint(args):
    """The constraint the flags ask for (None without one); bad patterns or schemas raise ConstraintError."""
    from jaxllm.structured import automata, constraints
    from jaxllm.errors import ConstraintError

    if args.json:
        return constraints.Json(max_depth=args.max_json_depth)
    if args.regex is not None:
        try:
            automata.regex_dfa(args.regex)  # fail here, with the flag's name, not inside generation
        except ConstraintError as e:
            raise ConstraintError(f"argument --regex: {e}") from None
        return constraints.Regex(args.regex)
    if args.choice:
        return constraints.Choice(args.choice)
    if args.json_schema is not None:
        try:
            text = Path(args.json_schema).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConstraintError(f"argument --json_schema: cannot read {args.json_schema} ({getattr(e, 'strerror', None) or e})") from None
        try:
            schema = constraints.JsonSchema(text)
            automata.schema_regex(schema.schema)
        except ConstraintError as e:
            raise ConstraintError(f"argument --json_schema: {args.json_schema}: {e}") from None
        return schema
    return None


def main(argv=None) -> int:
    args = parse_args(argv)
    import jaxllm  # after parsing: --help and flag errors stay instant
    from jaxllm import chat, devices
    from jaxllm.compilation import CompileCounter, enable_persistent_cache
    from jaxllm.checkpoint import load_any
    from jaxllm.warmup import warmup

    if not args.no_compile_cache:
        try:
            enable_persistent_cache()
        except jaxllm.CacheError as e:  # a cache others can write could hand XLA their code: go without
            print(f"sample.py: warning: {e}; running without the persistent compilation cache", file=sys.stderr)
    counter = CompileCounter().__enter__()  # --verbose reports what this process compiled
    try:
        prompts = list(args.prompt)
        for f in args.prompt_file:
            try:
                prompts.append(Path(f).read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError) as e:
                raise jaxllm.GenerationError(f"argument --prompt_file: cannot read {f} ({getattr(e, 'strerror', None) or e})") from None
        prompts = prompts or [""]
        constraint = _constraint(args)
        checkpoint = Path(args.checkpoint) if args.checkpoint else DEFAULT_CHECKPOINT
        if args.checkpoint is None and not checkpoint.exists():
            raise jaxllm.CheckpointError(f"no --checkpoint given and the bundled model is missing ({checkpoint})")
        params, cfg, tokenizer, model_defaults = load_any(checkpoint)
        if args.quantize:
            params = _quantize(params, args, checkpoint)
        params = devices.prepare(params, cfg)  # once, not per call (and the stacked copy is freed)
        if args.verbose:
            print(f"sample.py: {devices.describe(params, cfg)}", file=sys.stderr)
        _apply_defaults(args, model_defaults, checkpoint)
        if args.attention_impl:
            cfg = cfg.replace(attention_impl=args.attention_impl)
        if args.verbose:
            from jaxllm.attention import describe

            print(f"sample.py: {describe(cfg.attention_impl, cfg.compute_dtype, cfg.dim_per_head, sinks=args.sinks > 0)}",
                  file=sys.stderr)
        if tokenizer is None:
            raise jaxllm.CheckpointError(f"{checkpoint} has no tokenizer.model, so text prompts cannot be encoded")

        eos = args.eos_token_id if args.eos_token_id is not None else ([tokenizer.eos_id] if tokenizer.eos_id is not None else [])
        stop = list(args.stop)
        inputs = prompts
        if args.chat or args.system or args.few_shot:
            template = args.chat or "auto"
            few_shot = chat.load_few_shot(args.few_shot) if args.few_shot else []
            inputs = [chat.build_prompt(tokenizer, p, system=args.system, few_shot=few_shot, template=template) for p in prompts]
            end_ids, end_strings = chat.end_of_turn(tokenizer, template)
            eos, stop = eos + [i for i in end_ids if i not in eos], stop + end_strings

        kwargs = dict(
            tokenizer=tokenizer, max_new_tokens=args.max_new_tokens, num_return_sequences=args.num_return_sequences,
            stop=stop, include_stop_str_in_output=args.include_stop_str_in_output, eos_token_id=eos,
            repeat_count=args.stop_on_repetition, logprobs=args.logprobs, min_new_tokens=args.min_new_tokens,
            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
            repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
            frequency_penalty=args.frequency_penalty, no_repeat_ngram_size=args.no_repeat_ngram_size,
            bad_words=args.bad_words, logit_bias=args.logit_bias, allowed_token_ids=args.allowed_token_ids, seed=args.seed,
            constraint=constraint, enforce=not args.verify_only,
        )
        if args.retries:
            kwargs["retries"] = args.retries
        long_context = dict(window=args.window, sinks=args.sinks, prefill_chunk=args.prefill_chunk, kv_cache_dtype=args.kv_cache)
        if args.warmup:
            done = warmup(params, cfg, batch_size=len(inputs), **{k: v for k, v in kwargs.items() if k != "retries"}, **long_context)
            if args.verbose:
                print(f"sample.py: warmup: {len(done['prompt_lengths'])} prompt buckets (prompt lengths "
                      f"{done['prompt_lengths']}), {done['programs']} programs ({done['cache_hits']} from the "
                      f"persistent cache) in {done['compile_s']:.2f}s", file=sys.stderr)
        draft = _draft(args, tokenizer) if args.draft_checkpoint else None
        if args.stream:
            print(prompts[0], end="", flush=True)
            if draft:
                from jaxllm.speculative import speculative_generate_stream

                pieces = speculative_generate_stream(params, cfg, *draft, inputs, num_speculative_tokens=args.num_speculative_tokens,
                                                     **{k: v for k, v in kwargs.items() if k != "enforce"}, **long_context)
            else:
                pieces = jaxllm.generate_stream(params, cfg, inputs, **kwargs, **long_context)
            for row, piece in pieces:
                if row >= 0:
                    print(piece, end="", flush=True)
            print()
            _report(counter, args)
            return 0
        if draft:
            from jaxllm.speculative import speculative_generate

            result = speculative_generate(params, cfg, *draft, inputs, num_speculative_tokens=args.num_speculative_tokens,
                                          **{k: v for k, v in kwargs.items() if k != "enforce"}, **long_context)
            print(f"sample.py: speculative decoding accepted {result.timing['acceptance_rate']:.0%} of drafted tokens, "
                  f"{result.timing['tokens_per_block']:.2f} tokens per target forward", file=sys.stderr)
        elif args.num_beams > 1:
            from jaxllm.beam import beam_generate

            beam_kwargs = {k: kwargs[k] for k in ("tokenizer", "max_new_tokens", "num_return_sequences", "stop",
                                                  "include_stop_str_in_output", "eos_token_id", "min_new_tokens",
                                                  "repetition_penalty", "no_repeat_ngram_size", "bad_words",
                                                  "logit_bias", "allowed_token_ids", "constraint")}
            result = beam_generate(params, cfg, inputs, num_beams=args.num_beams, length_penalty=args.length_penalty,
                                   early_stopping={"true": True, "false": False}.get(args.early_stopping, "never"),
                                   **beam_kwargs, **long_context)
        else:
            result = jaxllm.generate(params, cfg, inputs, **kwargs, **long_context)
    except jaxllm.JaxllmError as e:
        print(f"sample.py: error: {one_line(str(e))}", file=sys.stderr)
        return 2
    _print(result, prompts, args)
    _report(counter, args, result.timing)
    return 0


def _draft(args, tokenizer):
    """--draft_checkpoint -> (params, cfg), with --quantize and --attention_impl applied as to the target."""
    import jaxllm
    from jaxllm import devices
    from jaxllm.checkpoint import load_any

    path = Path(args.draft_checkpoint)
    params, cfg, draft_tokenizer, _ = load_any(path)
    if draft_tokenizer is not None and draft_tokenizer.fingerprint != tokenizer.fingerprint:
        raise jaxllm.CheckpointError(f"argument --draft_checkpoint: {args.draft_checkpoint} has a different tokenizer")
    if args.quantize:
        params = _quantize(params, args, path)
    if args.attention_impl:
        cfg = cfg.replace(attention_impl=args.attention_impl)
    return devices.prepare(params, cfg), cfg


def _quantize(params, args, checkpoint: Path):
    """--quantize: float params -> quantized; a checkpoint saved quantized must already match."""
    import jax
    import jaxllm
    from jaxllm.quantize import quantization_of, quantize_params

    bits = {"int8": 8, "int4": 4}[args.quantize]
    stored = quantization_of(params)
    if stored is not None and (stored["bits"], stored["group_size"]) != (bits, args.group_size if bits == 4 else 0):
        raise jaxllm.CheckpointError(f"argument --quantize: {checkpoint} is already quantized as {stored}")
    return jax.jit(quantize_params, static_argnums=(1, 2))(params, bits, args.group_size)  # one program, not one per op


def _report(counter, args, timing=None) -> None:
    """--verbose: compilations in this process (and how many came from the persistent cache)."""
    counter.__exit__(None, None, None)
    if args.verbose:
        extra = f"; generate's compile_s {timing['compile_s']:.2f}s" if timing and "compile_s" in timing else ""
        print(f"sample.py: {counter.count} programs compiled or loaded, {counter.cache_hits} of them "
              f"from the persistent cache ({counter.new} new XLA compilations), {counter.seconds:.2f}s{extra}", file=sys.stderr)


def _apply_defaults(args, model_defaults: dict, checkpoint: Path) -> None:
    """Unset flags take generation_config.json's values, else the built-in ones; says which came from where."""
    taken = []
    for name, builtin in DEFAULTS.items():
        if getattr(args, name) is None:
            value = model_defaults.get(name, builtin)
            setattr(args, name, value)
            if name in model_defaults:
                taken.append(f"{name}={value}")
    if args.eos_token_id is None and "eos_token_id" in model_defaults:
        args.eos_token_id = model_defaults["eos_token_id"]
        taken.append(f"eos_token_id={args.eos_token_id}")
    if taken:
        print(f"sample.py: defaults from {checkpoint / 'generation_config.json'}: {', '.join(taken)}", file=sys.stderr)


def _print(result, prompts: list[str], args) -> None:
    for i, (ids, text, why) in enumerate(zip(result.token_ids, result.texts, result.finish_reasons)):
        prompt = prompts[result.prompt_index[i]]
        if args.format == "jsonl":
            record = {
                "prompt": prompt, "text": text, "token_ids": ids, "finish_reason": why,
                "num_prompt_tokens": result.num_prompt_tokens[i], "num_generated_tokens": len(ids),
                "timing": {k: round(v, 6) for k, v in result.timing.items()},
            }
            if args.num_return_sequences > 1:
                record["index"] = i % args.num_return_sequences
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
        else:
            if i:
                print("\n" + "-" * 40)
            print(prompt + text)
            if result.valid is not None and not result.valid[i]:
                print(f"sample.py: output {i} is not valid: {result.errors[i]}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
