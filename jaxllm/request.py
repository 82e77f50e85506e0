"""The generation request: every option of one generation, validated once, then prepared for a model.

Legend: B output rows (prompts × samples, or × beams), V vocab.

    Request(prompts, temperature=..., num_beams=..., window=..., ...)   what to generate; checked
        │                                                               when made (ranges, and which
        │                                                               options combine: `check_mode`)
    prepare(request, cfg, tokenizer, mode) ─▶ Prepared                  the rows as token ids, the
                                                                        per-row sampling and stop
                                                                        arrays, the constraint tables

`generate`, `generate_stream`, `beam_generate`, `speculative_generate`, their retries and
sample.py all go through these two steps. A `Request`'s fields are its signature: each field's
default, help text, allowed range and the decoding modes it applies to are stated once, in
`Request` below; sample.py builds its flags from them (same names, same defaults).

Decoding modes: "sample" (the default: sampling, or greedy at temperature 0), "beam"
(`num_beams > 1`) and "speculative" (a `draft` model, or `prompt_lookup_max`). An option that does not apply to the
request's mode must keep its default, or the request is refused with a `RequestError` naming
both sides, e.g. "length_penalty applies only with num_beams > 1".
"""

from __future__ import annotations

import dataclasses
import math
import string
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from jaxllm import chat, sampling
from jaxllm.structured import automata, constraints
from jaxllm.config import ModelConfig
from jaxllm.errors import ConstraintError, GenerationError
from jaxllm.kvcache import KV_DTYPES, CacheSpec
from jaxllm.sampling import SamplingParams, pow2_bucket
from jaxllm.stopping import StopParams

MODES = ("sample", "beam", "speculative")
SAMPLE, BEAM, SPECULATIVE = MODES
ANY, NOT_BEAM = frozenset(MODES), frozenset((SAMPLE, SPECULATIVE))
# Options only the sampling loop takes (a user predicate, verify-and-retry); README's table says so.
SAMPLING_ONLY = frozenset((SAMPLE,))
# What a mode's own option means when not given. Their fields default to None, so that giving one
# in a mode that does not take it is refused even when the value given is this one.
WHEN_UNSET = {"length_penalty": 1.0, "early_stopping": False, "num_speculative_tokens": 4}
MAX_LOGPROBS = 20
MAX_LOOKUP_NGRAM = 8
RENAMED = {  # old name -> the name that replaced it (both sides now use one name)
    "repeat_count": "stop_on_repetition", "enforce": "verify_only (enforce=False is verify_only=True)",
    "kv_cache": "kv_cache_dtype", "draft_checkpoint": "draft", "max_depth": "max_json_depth",
}


CONSTRAINT_FIELDS = ("constraint", "json", "json_schema", "regex", "choice")


class RequestError(GenerationError):
    """A request that cannot work, naming its fields as `{field}` in a template, so the API shows
    `temperature` and the CLI `--temperature` (`render`)."""

    def __init__(self, template: str):
        self.template = template
        self.fields = [name for _, name, _, _ in string.Formatter().parse(template) if name]
        super().__init__(self.render(str))

    def render(self, name: Callable[[str], str]) -> str:
        return self.template.format(**{f: name(f) for f in self.fields})


class RequestConstraintError(RequestError, ConstraintError):
    """A constraint option (regex, json_schema, ...) that cannot be turned into a constraint."""


def _shown(value) -> str:
    """A value inside a RequestError template (its braces escaped)."""
    return repr(value).replace("{", "{{").replace("}", "}}")


def option(default, help: str, *, check=None, allowed: str = "", modes=ANY, per_prompt: bool = False, flag: bool = True):
    """One request field: its default, a help line, the allowed range (`check(value) -> bool` for
    one value, `allowed` in words), the decoding modes it applies to, whether a list gives one
    value per prompt, and whether sample.py has a flag of that name."""
    meta = dict(help=help, check=check, allowed=allowed, modes=modes, per_prompt=per_prompt, flag=flag)
    return dataclasses.field(default=default, metadata=meta)


def _int(lo: int, hi: float = math.inf):
    return lambda v: isinstance(v, (int, np.integer)) and not isinstance(v, bool) and lo <= v <= hi


def _sampling_range(name: str):
    """sampling.RANGES (the one statement of a sampling control's range) as a check on one value."""
    return dict(check=lambda v: sampling.in_range(name, v), allowed=sampling.RANGES[name][1])


@dataclasses.dataclass(frozen=True, eq=False)
class Draft:
    """A draft model for speculative decoding: a smaller model sharing the target's tokenizer."""

    params: Any
    cfg: ModelConfig


@dataclasses.dataclass(frozen=True)
class Request:
    """One generation: prompts and every option, validated when made (raises `RequestError`).

    `prompts`: a text, a list of token ids, a chat (a list of {"role", "content"} messages), or a
    list of those. Options marked per prompt take one value for all prompts or a list with one
    value per prompt.
    """

    prompts: Any
    max_new_tokens: int = option(64, "tokens to generate", check=_int(1, 2**31 - 1), allowed=">= 1 and < 2**31")
    num_return_sequences: int = option(1, "independent samples per prompt (beam search: hypotheses, <= num_beams)",
                                       check=_int(1), allowed=">= 1")
    # --- sampling (sampling.py's chain, in its order)
    temperature: float = option(1.0, "0 = greedy", modes=NOT_BEAM, per_prompt=True, **_sampling_range("temperature"))
    top_k: int = option(0, "keep the k most likely tokens (<= 0: off)", modes=NOT_BEAM, per_prompt=True, **_sampling_range("top_k"))
    top_p: float = option(1.0, "nucleus sampling mass", modes=NOT_BEAM, per_prompt=True, **_sampling_range("top_p"))
    min_p: float = option(0.0, "keep tokens with p >= min_p * p_max", modes=NOT_BEAM, per_prompt=True, **_sampling_range("min_p"))
    repetition_penalty: float = option(1.0, "1 is off", per_prompt=True, **_sampling_range("repetition_penalty"))
    presence_penalty: float = option(0.0, "OpenAI/vLLM penalty over output tokens", modes=NOT_BEAM, per_prompt=True,
                                     **_sampling_range("presence_penalty"))
    frequency_penalty: float = option(0.0, "OpenAI/vLLM penalty over output tokens", modes=NOT_BEAM, per_prompt=True,
                                      **_sampling_range("frequency_penalty"))
    no_repeat_ngram_size: int = option(0, "never repeat an n-gram of this size", per_prompt=True,
                                       **_sampling_range("no_repeat_ngram_size"))
    min_new_tokens: int = option(0, "EOS is masked until this many tokens", per_prompt=True, **_sampling_range("min_new_tokens"))
    logit_bias: Any = option(None, "{token id: bias} added to the logits (-inf bans)", per_prompt=True)
    allowed_token_ids: Any = option(None, "only these ids may be generated")
    bad_words: Sequence[str] = option((), "strings never to generate (as the tokenizer splits them)")
    bad_words_ids: Sequence[Sequence[int]] = option((), "token sequences never to generate", flag=False)
    seed: int | None = option(None, "PRNG seed (None: random); same seed, same output", modes=NOT_BEAM, per_prompt=True,
                              **_sampling_range("seed"))
    # --- stopping
    stop: Sequence[str] = option((), "stop strings, matched on bytes across token boundaries")
    include_stop_str_in_output: bool = option(False, "keep the stop string in the text")
    eos_token_id: Any = option(None, "EOS id(s) (None: the tokenizer's; []: never stop early)")
    stop_on_repetition: int = option(0, "end a row whose last tokens repeat one n-gram this many times (0 = off)",
                                     check=lambda v: _int(0)(v) and v != 1, allowed="0 (off) or >= 2", modes=NOT_BEAM)
    stop_fn: Callable | None = option(None, "a predicate history -> bool[B] (a pure JAX function)", modes=SAMPLING_ONLY, flag=False)
    # --- what comes back
    logprobs: int | None = option(None, "return each token's log-probability and this many alternatives",
                                  check=_int(0, MAX_LOGPROBS), allowed=f"in [0, {MAX_LOGPROBS}]", modes=NOT_BEAM)
    stream: bool = option(False, "hand out text as it is generated (generate_stream)", modes=NOT_BEAM)
    # --- structured output (one of constraint, json, json_schema, regex, choice)
    constraint: Any = option(None, "a constraints.Regex/Json/JsonSchema/Choice, or one per prompt", per_prompt=True, flag=False)
    json: bool = option(False, "the output is a JSON object")
    json_schema: Any = option(None, "a JSON Schema (a dict or its text) the output must satisfy")
    regex: str | None = option(None, "a regex the whole output must match")
    choice: Sequence[str] = option((), "the output is exactly one of these strings")
    max_json_depth: int | None = option(None, "json: deepest nesting allowed (None: 16)", check=_int(1, 30), allowed="in [1, 30]")
    verify_only: bool = option(False, "do not enforce the constraint; only check the outputs", modes=SAMPLING_ONLY)
    retries: int = option(0, "sample rows whose output is not valid again, up to this many times",
                          check=_int(0, 100), allowed="in [0, 100]", modes=SAMPLING_ONLY)
    # --- decoding mode
    num_beams: int = option(1, "beam search with this many beams (1: sample / greedy)", check=_int(1), allowed=">= 1",
                            modes=frozenset((SAMPLE, BEAM)))
    length_penalty: float | None = option(None, f"beam score = sum log-prob / length ** length_penalty (None: {WHEN_UNSET['length_penalty']})",
                                          check=lambda v: isinstance(v, (int, float)) and math.isfinite(v),
                                          allowed="a finite number", modes=frozenset((BEAM,)))
    early_stopping: bool | str | None = option(None, f"when beam search stops: True, False or 'never' (None: {WHEN_UNSET['early_stopping']})",
                                               check=lambda v: v is True or v is False or v == "never",
                                               allowed="True, False or 'never'", modes=frozenset((BEAM,)))
    draft: Any = option(None, "speculative decoding: the draft model (a Draft; sample.py: its checkpoint)",
                        modes=frozenset((SPECULATIVE,)))
    prompt_lookup_max: int = option(0, "speculative decoding with no draft model: propose the tokens that followed the "
                                    "last N (down to 1) tokens where they last occurred in prompt or output (0: off)",
                                    check=_int(0, MAX_LOOKUP_NGRAM), allowed=f"in [0, {MAX_LOOKUP_NGRAM}]",
                                    modes=frozenset((SPECULATIVE,)))
    num_speculative_tokens: int | None = option(None, f"tokens drafted per target forward (None: {WHEN_UNSET['num_speculative_tokens']})",
                                                check=_int(1, 16), allowed="in [1, 16]", modes=frozenset((SPECULATIVE,)))
    # --- the cache
    window: int = option(0, "keep only the last W tokens in a ring cache (0: the model's own)", check=_int(0),
                         allowed=">= 0")
    sinks: int = option(0, "of the window, keep the first S tokens for good (attention sinks; S < W)", check=_int(0),
                        allowed=">= 0")
    prefill_chunk: int = option(512, "feed the prompt this many tokens at a time (0 = all at once)", check=_int(0),
                                allowed=">= 0")
    kv_cache_dtype: str | None = option(None, "int8: quantized KV cache (a scale per token and head)",
                                        check=lambda v: v in KV_DTYPES[1:], allowed=" or ".join(KV_DTYPES[1:]))
    chunk: int = option(16, "decode steps per host check (streams hand out text this often)", check=_int(1),
                        allowed=">= 1", modes=NOT_BEAM, flag=False)
    # --- prompt building
    chat: str | None = option(None, "wrap prompts in a chat template", check=lambda v: v in chat.TEMPLATES,
                              allowed=", ".join(chat.TEMPLATES))
    system: str | None = option(None, "system prompt (implies chat)")
    few_shot: Sequence[Mapping[str, str]] = option((), "example messages before each prompt (implies chat)")
    add_bos: bool = option(True, "start text prompts with BOS", flag=False)
    parse_special: bool = option(False, "read special-token markers in text prompts", flag=False)

    def __post_init__(self):
        prompts = self.prompts
        if isinstance(prompts, str) or _is_ids(prompts) or _is_messages(prompts):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise GenerationError("no prompts given")
        object.__setattr__(self, "prompts", prompts)
        for f in fields():
            _check_field(f, getattr(self, f.name), len(prompts))
        check_mode(self, self.mode)

    @property
    def mode(self) -> str:
        """The decoding mode the options ask for: "speculative" with a draft or prompt lookup, "beam" with num_beams > 1."""
        return mode_of(vars(self))

    def value(self, name: str):
        """Field `name`, or what it means when not given (WHEN_UNSET)."""
        value = getattr(self, name)
        return WHEN_UNSET[name] if value is None and name in WHEN_UNSET else value

    def replace(self, **changes) -> "Request":
        return dataclasses.replace(self, **changes)

    def options(self) -> dict:
        """The fields (prompts aside) set to something other than their defaults."""
        return {f.name: getattr(self, f.name) for f in fields() if not _is_default(f, getattr(self, f.name))}

    def subset(self, which: Sequence[int]) -> "Request":
        """The request for prompts `which` (indices, repeats allowed): per-prompt values follow their prompts."""
        changes = {f.name: [getattr(self, f.name)[i] for i in which] for f in fields()
                   if f.metadata["per_prompt"] and _per_prompt_list(f.name, getattr(self, f.name))}
        return self.replace(prompts=[self.prompts[i] for i in which], **changes)

    def per_row(self, name: str, index: Sequence[int]):
        """Field `name` for rows continuing prompts `index`: a per-prompt list expanded, else the one value."""
        value = getattr(self, name)
        return [value[i] for i in index] if _per_prompt_list(name, value) else value

    @property
    def constraint_per_prompt(self) -> list:
        """Each prompt's constraint (None: free), from `constraint` or the json/json_schema/regex/choice options."""
        if self.json:
            one = constraints.Json() if self.max_json_depth is None else constraints.Json(max_depth=self.max_json_depth)
        elif self.json_schema is not None:
            one = constraints.JsonSchema(self.json_schema)
        elif self.regex is not None:
            one = constraints.Regex(self.regex)
        elif self.choice:
            one = constraints.Choice(list(self.choice))
        else:
            one = self.constraint
        return list(one) if isinstance(one, (list, tuple)) else [one] * len(self.prompts)


def fields() -> tuple[dataclasses.Field, ...]:
    """The request's options (prompts aside), in order: name, default, metadata (help, range, modes)."""
    return dataclasses.fields(Request)[1:]


def make(request, options: Mapping[str, Any]) -> Request:
    """A Request from prompts and keyword options, or a ready Request with `options` replacing fields."""
    unknown = sorted(set(options) - {f.name for f in fields()})
    if unknown:
        hints = [f"{u} (now {RENAMED[u]})" if u in RENAMED else u for u in unknown]
        raise TypeError(f"unknown generation option(s): {', '.join(hints)}")
    if isinstance(request, Request):
        return request.replace(**options) if options else request
    return Request(request, **options)


def with_model_defaults(options: Mapping[str, Any], defaults: Mapping[str, Any]) -> tuple[dict, list[str]]:
    """Options given, completed by a model's own defaults (generation_config.json) for the options
    not given that apply to the decoding mode the given ones ask for. -> (options, names taken)"""
    mode = mode_of(options)
    taken = [f.name for f in fields() if f.name in defaults and f.name not in options and mode in f.metadata["modes"]]
    return {**options, **{k: defaults[k] for k in taken}}, taken


def mode_of(options: Mapping[str, Any]) -> str:
    """The decoding mode options ask for (see the module docstring)."""
    if options.get("draft") is not None or options.get("prompt_lookup_max"):
        return SPECULATIVE
    return BEAM if options.get("num_beams", 1) > 1 else SAMPLE


def _given(value) -> bool:
    return value is not None and value is not False and not (isinstance(value, (list, tuple)) and not value)


def _is_ids(p) -> bool:
    return isinstance(p, (list, tuple, np.ndarray)) and len(p) > 0 and isinstance(p[0], (int, np.integer))


def _is_messages(p) -> bool:
    return isinstance(p, (list, tuple)) and len(p) > 0 and isinstance(p[0], Mapping)


def _is_default(f: dataclasses.Field, value) -> bool:
    d = f.default
    if d is None or isinstance(d, bool):
        return value is d or (isinstance(d, bool) and isinstance(value, (bool, np.bool_)) and bool(value) == d)
    if isinstance(d, tuple):
        return isinstance(value, (list, tuple)) and len(value) == 0
    numbers = (int, float, np.integer, np.floating)
    return isinstance(value, numbers) and not isinstance(value, bool) and value == d


def _per_prompt_list(name: str, value) -> bool:
    """Is this per-prompt field's value a list of per-prompt values (not one value for all)?"""
    if name == "logit_bias" or name == "constraint":
        return isinstance(value, (list, tuple))  # one mapping / constraint, or a list of them
    return isinstance(value, (list, tuple, np.ndarray))


def _check_field(f: dataclasses.Field, value, num_prompts: int) -> None:
    name, meta = f.name, f.metadata
    values = [value]
    if meta["per_prompt"] and _per_prompt_list(name, value):
        if len(value) != num_prompts:
            raise RequestError(f"{{{name}}} has {len(value)} values for {num_prompts} prompts")
        values = list(value)
    if meta["check"] is None or value is None and f.default is None:
        return
    for v in values:
        if not meta["check"](v):
            raise RequestError(f"{{{name}}} must be {meta['allowed']}, got {_shown(v)}")


def check_mode(request: Request, mode: str) -> None:
    """The rules for which options combine, for a request decoded in `mode` (one place: the API and
    sample.py refuse the same things). Raises RequestError naming both sides."""
    drafter = "{draft}" if request.draft is not None else "{prompt_lookup_max}" if request.prompt_lookup_max else None
    trigger = {BEAM: "{num_beams} > 1", SPECULATIVE: drafter or "{draft} or {prompt_lookup_max}"}
    if request.draft is not None and request.prompt_lookup_max:
        raise RequestError("{draft} and {prompt_lookup_max} are two ways to draft tokens: give one")
    what = {SAMPLE: "sampling", BEAM: "beam search", SPECULATIVE: "speculative decoding"}
    if request.mode != SAMPLE and request.mode != mode:
        raise RequestError(f"{trigger[request.mode]} asks for {what[request.mode]}, and this call does {what[mode]}")
    for f in fields():
        modes = f.metadata["modes"]
        if mode in modes or _is_default(f, getattr(request, f.name)):
            continue
        if mode != SAMPLE:
            raise RequestError(f"{{{f.name}}} does not work with {trigger[mode]} ({what[mode]})")
        (other,) = modes  # an option of one other mode
        raise RequestError(f"{{{f.name}}} applies only with {trigger[other]}")
    r = request
    if mode == BEAM and r.num_return_sequences > r.num_beams:
        raise RequestError(f"{{num_return_sequences}} ({r.num_return_sequences}) must be <= {{num_beams}} ({r.num_beams})")
    if r.sinks and r.sinks >= r.window:
        raise RequestError(f"{{sinks}} needs a {{window}} larger than it (got sinks {r.sinks}, window {r.window})")
    chosen = [n for n in CONSTRAINT_FIELDS if _given(getattr(r, n))]
    if len(chosen) > 1:
        raise RequestError(f"{{{chosen[0]}}} and {{{chosen[1]}}}: choose one constraint")
    if r.max_json_depth is not None and not r.json:
        raise RequestError("{max_json_depth} applies only with {json}")
    for name in ("verify_only", "retries"):
        if getattr(r, name) and not chosen:
            raise RequestError(f"{{{name}}} needs a constraint to check ({{json}}, {{json_schema}}, {{regex}} or {{choice}})")
        if getattr(r, name) and r.stream:
            raise RequestError(f"{{{name}}} does not work with {{stream}} (rows are re-sampled after the stream)")


# ---------------------------------------------------------------------------- preparation for a model


@dataclasses.dataclass
class Prepared:
    """A request turned into the decode loop's inputs: B rows (each prompt repeated per sample or beam)."""

    request: Request
    prompts: list[list[int]]  # [B] token ids, one per output row
    prompt_index: list[int]  # [B] which prompt each row continues
    sampling: SamplingParams  # [B] rows
    stops: StopParams  # [B] rows
    stop_strings: list[str]  # the request's stop strings, and the chat template's
    buffer_len: int  # static output buffer, >= max_new_tokens (a power of two, >= chunk)
    pad_id: int
    spec: CacheSpec
    constraints: list  # [B] a Constraint or None per row
    automaton: constraints.Automaton | None = None  # None: no row is enforced
    row_states: constraints.RowState | None = None


def prepare(request: Request, cfg: ModelConfig, tokenizer, mode: str | None = None) -> Prepared:
    """Checks `request` against the model and tokenizer and builds the loop's inputs.

    mode: the decoder that will run it (default: `request.mode`); beam search repeats each
    prompt for its beams and decodes greedily.
    """
    mode = mode or request.mode
    check_mode(request, mode)
    r = request
    prompts, eos, stop = _encode(r, tokenizer)
    if any(not 0 <= e < cfg.vocab_size for e in eos):
        raise GenerationError(f"eos_token_id {eos} is outside the vocabulary (size {cfg.vocab_size})")
    # with a tokenizer, ids past its vocabulary (a padded embedding table's) are no tokens to decode after
    vocab = min(cfg.vocab_size, tokenizer.vocab_size) if tokenizer is not None else cfg.vocab_size
    for i, p in enumerate(prompts):
        if not p:
            raise GenerationError(f"prompt {i} is empty (no tokens to condition on)")
        if min(p) < 0 or max(p) >= vocab:
            raise GenerationError(f"prompt {i} has token ids outside the vocabulary (size {vocab})")
        spec = CacheSpec(window=r.window, sinks=r.sinks, prefill_chunk=r.prefill_chunk, dtype=r.kv_cache_dtype or "")
        if len(p) + r.max_new_tokens > cfg.max_seq_len and not spec.ring_size(cfg):  # a ring never fills
            raise GenerationError(
                f"prompt {i} has {len(p)} tokens; with max_new_tokens={r.max_new_tokens} it needs "
                f"{len(p) + r.max_new_tokens} positions, more than the model's context of {cfg.max_seq_len}"
            )
    if r.include_stop_str_in_output and not stop:
        raise RequestError("{include_stop_str_in_output} applies only with {stop} strings (or a chat template that has them)")
    copies = r.num_beams if mode == BEAM else r.num_return_sequences
    index = [i for i in range(len(prompts)) for _ in range(copies)]
    B = len(index)
    values = {name: r.per_row(name, index) for name in sampling.RANGES}
    if mode == BEAM:  # the search ranks by log-probability: nothing is drawn
        values.update(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, presence_penalty=0.0, frequency_penalty=0.0, seed=0)
    sp = SamplingParams.make(
        B, cfg.vocab_size, **values, logit_bias=r.per_row("logit_bias", index), allowed_token_ids=r.allowed_token_ids,
        bad_words_ids=list(r.bad_words_ids) + _bad_words_ids(r.bad_words, tokenizer),
        sample_index=[row % copies for row in range(B)],
        vocab_limit=tokenizer.vocab_size if tokenizer is not None else None,  # ids past the tokenizer are no tokens
    )
    stops = StopParams.make(B, r.max_new_tokens, eos, stop, tokenizer.token_bytes() if stop else None, r.stop_on_repetition)
    per_prompt = _constraints(r)
    rows_constraint = [per_prompt[i] for i in index]
    prepared = Prepared(
        request=r, prompts=[prompts[i] for i in index], prompt_index=index, sampling=sp, stops=stops, stop_strings=stop,
        buffer_len=max(r.chunk, pow2_bucket(r.max_new_tokens)),
        pad_id=tokenizer.pad_id if tokenizer is not None and tokenizer.pad_id is not None else 0,
        spec=spec.check(cfg), constraints=rows_constraint,
    )
    if not r.verify_only and any(c is not None for c in rows_constraint):
        prepared.automaton, prepared.row_states = constraints.build(rows_constraint, tokenizer, cfg.vocab_size)
    return prepared


def _constraints(r: Request) -> list:
    """Each prompt's constraint; one made from an option (regex, json_schema, ...) is compiled here,
    so a bad pattern or schema is refused naming that option."""
    field = next((n for n in CONSTRAINT_FIELDS[1:] if _given(getattr(r, n))), None)
    try:
        per_prompt = r.constraint_per_prompt
        if field == "regex":
            automata.regex_dfa(r.regex)
        elif field == "json_schema":
            automata.schema_regex(per_prompt[0].schema)
    except ConstraintError as e:
        if field is None:
            raise
        raise RequestConstraintError(f"{{{field}}}: " + str(e).replace("{", "{{").replace("}", "}}")) from None
    return per_prompt


def _encode(r: Request, tokenizer) -> tuple[list[list[int]], list[int], list[str]]:
    """-> (each prompt's ids, EOS ids, stop strings), with the chat template applied when asked for."""
    template = r.chat or ("auto" if r.system or r.few_shot or any(_is_messages(p) for p in r.prompts) else None)
    needs_tokenizer = template or r.stop or r.bad_words or any(isinstance(p, str) for p in r.prompts)
    if needs_tokenizer and tokenizer is None:
        what = "text prompts" if any(isinstance(p, str) for p in r.prompts) else "chat, stop strings and bad_words"
        raise GenerationError(f"{what} need a tokenizer (or pass token ids)")
    prompts = []
    for p in r.prompts:
        if _is_messages(p):
            ids = chat.apply_chat_template(tokenizer, p, template)
        elif isinstance(p, str) and template:
            ids = chat.build_prompt(tokenizer, p, system=r.system, few_shot=r.few_shot, template=template)
        elif isinstance(p, str):
            ids = tokenizer.encode(p, add_bos=r.add_bos, parse_special=r.parse_special)
        else:
            try:
                ids = [int(t) for t in p]
            except (TypeError, ValueError):
                raise GenerationError(f"a prompt must be a text, token ids or chat messages, got {p!r:.60}") from None
        prompts.append(ids)
    if r.eos_token_id is None:
        eos = [tokenizer.eos_id] if tokenizer is not None and tokenizer.eos_id is not None else []
    else:  # Python ints: a huge id is refused, not overflowed
        eos = [int(e) for e in np.atleast_1d(np.asarray(r.eos_token_id, object))]
    stop = [str(s) for s in r.stop]
    if template:
        end_ids, end_strings = chat.end_of_turn(tokenizer, template)
        eos, stop = eos + [i for i in end_ids if i not in eos], stop + [s for s in end_strings if s not in stop]
    return prompts, eos, stop


def _bad_words_ids(words: Sequence[str], tokenizer) -> list[list[int]]:
    """Strings -> token sequences, as the tokenizer splits them with and without a leading space."""
    seqs = {tuple(tokenizer.encode(v)) for w in words for v in (w, " " + w)} if words else set()
    return [list(s) for s in seqs if s]
