"""OpenAI's request bodies -> a jaxllm `Request`, and its results -> OpenAI's response objects.

Field names are OpenAI's, plus the sampling fields vLLM adds (top_k, min_p,
repetition_penalty, min_tokens, ignore_eos, guided_regex, guided_choice, guided_json). Every
field is checked here for its type and range; an unknown field, a wrong type or a value out of
range is an `ApiError` (400) naming the field. A field jaxllm does not serve (tools, echo, ...)
is refused by name rather than ignored.
"""

from __future__ import annotations

import math
import time
import uuid
from typing import Any, Callable

from jaxllm.request import Request, RequestError
from jaxllm.stopping import FINISH_REASONS

# jaxllm's finish reasons -> OpenAI's; the others (repetition, constraint) pass through
FINISH = {"eos": "stop", "stop": "stop", "length": "length"}
MAX_STOP = 4  # stop strings per request, as OpenAI allows
MAX_LOGIT_BIAS = 300  # entries
MAX_PROMPT_CHARS = 1 << 20
# Request fields -> the OpenAI names a RequestError shows
API_NAMES = {"max_new_tokens": "max_tokens", "num_return_sequences": "n", "min_new_tokens": "min_tokens",
             "regex": "guided_regex", "choice": "guided_choice", "json_schema": "response_format", "json": "response_format"}


class ApiError(Exception):
    """An error answered as OpenAI's error object: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.kind = message, status, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _number(lo: float, hi: float) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and lo <= v <= hi


def _integer(lo: float, hi: float) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


_bool = lambda v: isinstance(v, bool)
_str = lambda v: isinstance(v, str)
_object = lambda v: isinstance(v, dict)
_any = lambda v: True

# name -> (check, what the check allows in words); None is allowed for every field (= not given)
COMMON = {
    "model": (_str, "a string"),
    "max_tokens": (_integer(1, 2**31 - 1), "an integer >= 1"),
    "temperature": (_number(0, 2), "a number in [0, 2]"),
    "top_p": (_number(1e-9, 1), "a number in (0, 1]"),
    "n": (_integer(1, 2**31 - 1), "an integer >= 1"),
    "stream": (_bool, "a boolean"),
    "stream_options": (_object, "an object"),
    "stop": (lambda v: _str(v) or isinstance(v, list) and all(map(_str, v)), "a string or a list of strings"),
    "presence_penalty": (_number(-2, 2), "a number in [-2, 2]"),
    "frequency_penalty": (_number(-2, 2), "a number in [-2, 2]"),
    "logit_bias": (_object, "an object of token id -> bias"),
    "seed": (_integer(-(2**63), 2**64 - 1), "an integer"),
    "user": (_str, "a string"),
    "top_k": (_integer(-1, 2**31 - 1), "an integer >= -1 (-1 or 0: off)"),
    "min_p": (_number(0, 1), "a number in [0, 1]"),
    "repetition_penalty": (_number(1e-6, 100), "a number in (0, 100]"),
    "min_tokens": (_integer(0, 2**31 - 1), "an integer >= 0"),
    "ignore_eos": (_bool, "a boolean"),
    "response_format": (_object, "an object"),
    "guided_regex": (_str, "a string"),
    "guided_choice": (lambda v: isinstance(v, list) and len(v) > 0 and all(map(_str, v)), "a non-empty list of strings"),
    "guided_json": (lambda v: _object(v) or _str(v), "a JSON Schema (an object or its text)"),
}
COMPLETION = COMMON | {
    "prompt": (_any, "a string, a list of token ids, or a list of one of those"),
    "logprobs": (_integer(0, 20), "an integer in [0, 20]"),
    "echo": (lambda v: v is False, "false (echo is not served)"),
    "best_of": (lambda v: v == 1, "1 (best_of is not served)"),
    "suffix": (lambda v: False, "absent (suffix is not served)"),
}
CHAT = COMMON | {
    "messages": (lambda v: isinstance(v, list) and len(v) > 0, "a non-empty list of messages"),
    "logprobs": (_bool, "a boolean"),
    "top_logprobs": (_integer(0, 20), "an integer in [0, 20]"),
    "max_completion_tokens": (_integer(1, 2**31 - 1), "an integer >= 1"),
}
NOT_SERVED = ("tools", "tool_choice", "functions", "function_call", "parallel_tool_calls", "audio", "modalities",
              "prediction", "service_tier", "store", "metadata", "reasoning_effort", "web_search_options")


def check_fields(body: Any, allowed: dict) -> dict:
    """Types and ranges of every field; null means "not given". -> the fields given."""
    if not isinstance(body, dict):
        raise ApiError("the request body must be a JSON object")
    given = {}
    for name, value in body.items():
        if name in NOT_SERVED:
            if value is None or value == [] or value == "none":
                continue
            raise ApiError(f"{name} is not supported by this server", param=name, code="unsupported_parameter")
        if name not in allowed:
            raise ApiError(f"unknown field {name!r}", param=name, code="unknown_parameter")
        if value is None:
            continue
        check, words = allowed[name]
        if not check(value):
            raise ApiError(f"{name} must be {words}, got {_short(value)}", param=name, code="invalid_value")
        given[name] = value
    return given


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _prompt(value, vocab_size: int):
    """A completion's prompt: a string or token ids, alone or as a list of one."""
    if isinstance(value, list) and len(value) == 1 and (isinstance(value[0], str) or isinstance(value[0], list)):
        value = value[0]
    if isinstance(value, str):
        if not value:
            raise ApiError("prompt must not be empty", param="prompt")
        if len(value) > MAX_PROMPT_CHARS:
            raise ApiError(f"prompt is longer than {MAX_PROMPT_CHARS} characters", param="prompt")
        return value
    if isinstance(value, list) and value and all(_integer(0, vocab_size - 1)(t) for t in value):
        return list(value)
    if isinstance(value, list) and len(value) > 1 and all(isinstance(p, (str, list)) for p in value):
        raise ApiError("prompt: one prompt per request (send several requests, or use n)", param="prompt")
    raise ApiError(f"prompt must be a non-empty string or a list of token ids in [0, {vocab_size}), got {_short(value)}",
                   param="prompt")


def _messages(value) -> list[dict]:
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer"):
            raise ApiError(f"messages[{i}] needs a role of system, user or assistant", param="messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text is served
            if not all(isinstance(p, dict) and p.get("type") == "text" and _str(p.get("text")) for p in content):
                raise ApiError(f"messages[{i}].content: only text parts are supported", param="messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(f"messages[{i}].content must be a string", param="messages")
        unknown = set(m) - {"role", "content", "name"}
        if unknown:
            raise ApiError(f"messages[{i}]: unknown field {sorted(unknown)[0]!r}", param="messages")
        out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    return out


def _constraint(given: dict) -> dict:
    """response_format / guided_* -> the Request's constraint option (at most one)."""
    chosen = [k for k in ("response_format", "guided_regex", "guided_choice", "guided_json") if k in given]
    if len(chosen) > 1:
        raise ApiError(f"{chosen[0]} and {chosen[1]}: give one", param=chosen[1])
    if not chosen:
        return {}
    name, value = chosen[0], given[chosen[0]]
    if name == "guided_regex":
        return {"regex": value}
    if name == "guided_choice":
        return {"choice": list(value)}
    if name == "guided_json":
        return {"json_schema": value}
    kind = value.get("type")
    if kind == "text":
        return {}
    if kind == "json_object":
        return {"json": True}
    if kind == "json_schema":
        spec = value.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise ApiError("response_format.json_schema.schema must be a JSON Schema object", param="response_format")
        return {"json_schema": schema}
    raise ApiError("response_format.type must be text, json_object or json_schema", param="response_format")


def to_request(body: Any, chat: bool, *, model: str, vocab_size: int, max_n: int) -> tuple[Request, dict]:
    """An OpenAI body -> (the Request, what the response needs: stream, include_usage, logprobs kind).

    max_tokens: completions default to 16 (OpenAI's); chat to the rest of the context (the
    caller sets it once the prompt is tokenized: `meta["max_tokens"]` is None then).
    """
    given = check_fields(body, CHAT if chat else COMPLETION)
    if "model" in given and given["model"] != model:
        raise ApiError(f"the model {given['model']!r} does not exist (this server serves {model!r})", param="model",
                       code="model_not_found")
    if chat and "messages" not in given or not chat and "prompt" not in given:
        what = "messages" if chat else "prompt"
        raise ApiError(f"{what} is required", param=what)
    if given.get("n", 1) > max_n:
        raise ApiError(f"n must be at most {max_n} on this server", param="n")
    stop = given.get("stop", [])
    stop = [stop] if isinstance(stop, str) else stop
    if len(stop) > MAX_STOP or any(not s for s in stop):
        raise ApiError(f"stop: at most {MAX_STOP} non-empty strings", param="stop")
    bias = given.get("logit_bias", {})
    if len(bias) > MAX_LOGIT_BIAS:
        raise ApiError(f"logit_bias: at most {MAX_LOGIT_BIAS} entries", param="logit_bias")
    logit_bias = {}
    for key, value in bias.items():
        if not (key.isascii() and key.isdecimal() and int(key) < vocab_size) or not _number(-100, 100)(value):
            raise ApiError(f"logit_bias: keys must be token ids in [0, {vocab_size}) and values numbers in [-100, 100], "
                           f"got {key!r}: {_short(value)}", param="logit_bias")
        logit_bias[int(key)] = float(value)
    options = dict(
        temperature=given.get("temperature", 1.0), top_p=given.get("top_p", 1.0), top_k=max(0, given.get("top_k", 0)),
        min_p=given.get("min_p", 0.0), presence_penalty=given.get("presence_penalty", 0.0),
        frequency_penalty=given.get("frequency_penalty", 0.0), repetition_penalty=given.get("repetition_penalty", 1.0),
        num_return_sequences=given.get("n", 1), stop=stop, logit_bias=logit_bias or None,
        seed=given["seed"] % 2**32 if "seed" in given else None, **_constraint(given),
    )
    if chat:
        prompt = _messages(given["messages"])
        max_tokens = given.get("max_completion_tokens", given.get("max_tokens"))
        logprobs = given.get("top_logprobs", 0) if given.get("logprobs") else None
        if "top_logprobs" in given and not given.get("logprobs"):
            raise ApiError("top_logprobs needs logprobs: true", param="top_logprobs")
    else:
        prompt = _prompt(given["prompt"], vocab_size)
        max_tokens = given.get("max_tokens", 16)
        logprobs = given.get("logprobs")
    stream = given.get("stream", False)
    if "stream_options" in given and not stream:
        raise ApiError("stream_options needs stream: true", param="stream_options")
    if stream and logprobs is not None:
        raise ApiError("logprobs are returned only without stream on this server", param="logprobs")
    min_tokens = given.get("min_tokens", 0)
    if given.get("ignore_eos"):  # EOS masked for the whole output (it is never chosen)
        if max_tokens is None:
            raise ApiError("ignore_eos needs max_tokens", param="ignore_eos")
        min_tokens = max_tokens
    try:
        request = Request(prompt, max_new_tokens=max_tokens or 1, min_new_tokens=min_tokens, logprobs=logprobs, **options)
    except RequestError as e:
        raise ApiError(e.render(lambda f: API_NAMES.get(f, f)), param=API_NAMES.get(e.fields[0], e.fields[0])
                       if e.fields else None) from None
    meta = dict(stream=stream, include_usage=bool(given.get("stream_options", {}).get("include_usage")),
                max_tokens=max_tokens, chat=chat, id=("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex,
                created=int(time.time()), model=model)
    return request, meta


# ---------------------------------------------------------------------------- responses


def finish_reason(reason: str) -> str:
    return FINISH.get(reason, reason)


def _token_text(tokenizer, i: int) -> str:
    return tokenizer.bytes_of([i]).decode("utf-8", errors="replace")


def _logprobs(result, row: int, tokenizer, chat: bool, text: str):
    if result.logprobs is None:
        return None
    ids, lps, tops = result.token_ids[row], result.logprobs[row], result.top_logprobs[row]
    if chat:
        entry = lambda i, lp: {"token": _token_text(tokenizer, i), "logprob": lp, "bytes": list(tokenizer.bytes_of([i]))}
        return {"content": [entry(i, lp) | {"top_logprobs": [entry(a, alp) for a, alp in top.items()]}
                            for i, lp, top in zip(ids, lps, tops)]}
    tokens = [_token_text(tokenizer, i) for i in ids]
    offsets = [sum(len(t) for t in tokens[:k]) for k in range(len(tokens))]
    return {"tokens": tokens, "token_logprobs": lps, "text_offset": offsets,
            "top_logprobs": [{_token_text(tokenizer, a): alp for a, alp in top.items()} for top in tops]}


def usage(result) -> dict:
    prompt = result.num_prompt_tokens[0] if result.num_prompt_tokens else 0
    completion = sum(len(ids) for ids in result.token_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def response(result, meta: dict, tokenizer) -> dict:
    """A finished GenerationResult -> a completion or chat.completion object."""
    choices = []
    for row, text in enumerate(result.texts):
        reason = finish_reason(result.finish_reasons[row])
        lp = _logprobs(result, row, tokenizer, meta["chat"], text)
        if meta["chat"]:
            choices.append({"index": row, "message": {"role": "assistant", "content": text}, "logprobs": lp,
                            "finish_reason": reason})
        else:
            choices.append({"index": row, "text": text, "logprobs": lp, "finish_reason": reason})
    return {"id": meta["id"], "object": "chat.completion" if meta["chat"] else "text_completion",
            "created": meta["created"], "model": meta["model"], "choices": choices, "usage": usage(result)}


def chunk(meta: dict, row: int, text: str | None = None, reason: str | None = None, *, first: bool = False) -> dict:
    """One streamed piece of row `row` (text, or its finish reason)."""
    if meta["chat"]:
        delta = ({"role": "assistant", "content": ""} if first else {}) | ({"content": text} if text is not None else {})
        choice = {"index": row, "delta": delta, "logprobs": None, "finish_reason": reason}
    else:
        choice = {"index": row, "text": text or "", "logprobs": None, "finish_reason": reason}
    return {"id": meta["id"], "object": "chat.completion.chunk" if meta["chat"] else "text_completion",
            "created": meta["created"], "model": meta["model"], "choices": [choice]}


def usage_chunk(meta: dict, result) -> dict:
    return {"id": meta["id"], "object": "chat.completion.chunk" if meta["chat"] else "text_completion",
            "created": meta["created"], "model": meta["model"], "choices": [], "usage": usage(result)}


assert set(FINISH) <= set(FINISH_REASONS)
