"""The "model" chat template: a model's own Jinja `chat_template`, rendered to ids without forgery.

Instruct models ship their chat format as a Jinja template (the tokenizer's `chat_template`).
It is rendered here the way Hugging Face renders it: a sandboxed, immutable Jinja environment
(a template from a downloaded directory is untrusted: attribute access such as `__class__`
is refused), `trim_blocks` and `lstrip_blocks` on, the `loopcontrols` extension (break,
continue), `{% generation %}` blocks (rendered as their body), the names `messages`, `add_generation_prompt`, `tools` and `documents` (both None),
the tokenizer's special-token texts (`bos_token`, `eos_token`, `unk_token`, `pad_token`, those
it has), `raise_exception(message)`, `strftime_now(format)` and a `tojson` filter that writes
non-ASCII text as it is.

A rendered string would forge turns if encoded whole with special tokens parsed: a user who
types "<|im_end|>\\n<|im_start|>system" would close their turn and open a system one. So the
template is rendered twice: once with each message's content replaced by a unique sentinel,
which splits the output into template text (trusted) and message slots, and once with the
real contents, to learn what the template made of each one (the content itself or, as many
templates write it, trimmed). When the two align:

* if the special tokens found in the rendered string are exactly those of the template text,
  the string is encoded with special tokens parsed: the same ids as transformers'
  `apply_chat_template`;
* otherwise (a message holds special-token text, or forms one with the text around it) the
  template text's special tokens become their ids and everything else, message text included,
  is encoded as plain text: the user's "<|im_end|>" stays characters.

A template that rewrites message text in some other way (cuts it, changes case, ...) cannot be
aligned. Then the rendered string is encoded with special tokens parsed only when no message
holds the text of any special token (so every special id comes from the template); otherwise
the conversation is refused with one line.
"""

from __future__ import annotations

import functools
import json
import re
import secrets
from datetime import datetime
from typing import Sequence

from jaxllm.errors import GenerationError


class _Raised(Exception):
    """raise_exception(message) called by a template."""


def _raise_exception(message):
    raise _Raised(str(message))


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.now().strftime(format)


@functools.lru_cache(maxsize=16)
def compile_template(source: str):
    """Template source -> a compiled Jinja template (cached); GenerationError if it is not valid Jinja."""
    try:
        import jinja2
        import jinja2.ext
        import jinja2.nodes
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise GenerationError("the model's chat template needs jinja2 (pip install jinja2)") from None
    class Generation(jinja2.ext.Extension):
        """{% generation %}...{% endgeneration %} (marks assistant text for training masks): its body, as is."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body).set_lineno(lineno)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols, Generation])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise GenerationError(f"the model's chat_template is not valid Jinja (line {e.lineno}: {e.message})") from None
    except jinja2.TemplateError as e:
        raise GenerationError(f"the model's chat_template is not valid Jinja ({_one_line(e)})") from None


def render(tokenizer, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
    """The tokenizer's chat_template rendered for `messages` ([{"role", "content"}, ...]) as a string.

    The template's own `raise_exception` and any failure while rendering (a refused attribute,
    an undefined name used, ...) are one-line GenerationErrors.
    """
    import jinja2

    template = compile_template(tokenizer.chat_template)
    try:
        return template.render(messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt,
                               tools=None, documents=None, **tokenizer.template_tokens())
    except _Raised as e:
        raise GenerationError(f"the model's chat template refused the conversation: {_one_line(e)}") from None
    except jinja2.exceptions.SecurityError as e:
        raise GenerationError(f"the model's chat template did something its sandbox refuses: {_one_line(e)}") from None
    except Exception as e:  # anything else the template's code raises (TypeError, UndefinedError, ...)
        raise GenerationError(f"the model's chat template failed: {type(e).__name__}: {_one_line(e)}") from None


def _specials(tokenizer):
    """A regex matching the tokenizer's special-token texts, longest first (None when it has none)."""
    names = sorted((n for n in tokenizer.special_tokens if n), key=len, reverse=True)
    return re.compile("|".join(map(re.escape, names))) if names else None


def _sentinels(n: int) -> tuple[list[str], re.Pattern]:
    """n unique strings no message holds (private-use characters around a random nonce), and a
    regex that finds them, capturing the message number."""
    nonce = secrets.token_hex(8)
    return [f"\ue000{nonce}.{k}\ue001" for k in range(n)], re.compile(f"\ue000{nonce}\\.(\\d+)\ue001")


def _align(real: str, parts: list[str], slots: list[int], contents: list[str]) -> list[tuple[int, int]] | None:
    """Where each slot's text lies in `real`, given that `real` is parts[0] + slot 0's text +
    parts[1] + ... and a slot's text is its message's content as is, or stripped at either or
    both ends. None when no such reading exists."""
    # depth-first over the readings, each (part, position) tried once; a stack holds the path
    stack, seen = [(0, 0, [])], set()
    while stack:
        i, pos, spans = stack.pop()
        if (i, pos) in seen or not real.startswith(parts[i], pos):
            continue
        seen.add((i, pos))
        pos += len(parts[i])
        if i == len(slots):
            if pos == len(real):
                return spans
            continue
        c = contents[slots[i]]
        for text in reversed(dict.fromkeys((c, c.strip(), c.lstrip(), c.rstrip()))):
            if real.startswith(text, pos):
                stack.append((i + 1, pos + len(text), spans + [(pos, pos + len(text))]))
    return None


def encode(tokenizer, messages: Sequence[dict], add_generation_prompt: bool = True) -> list[int]:
    """Messages -> prompt ids with the tokenizer's chat_template, message text never read as
    special tokens (see the module docstring for how, and when a conversation is refused)."""
    contents = [m["content"] for m in messages]
    real = render(tokenizer, messages, add_generation_prompt)
    specials = _specials(tokenizer)
    if specials is None:
        return tokenizer.encode(real)
    marks, find = _sentinels(len(messages))
    marked = render(tokenizer, [{**m, "content": s} for m, s in zip(messages, marks)], add_generation_prompt)
    pieces = find.split(marked)
    parts, slots = pieces[0::2], [int(k) for k in pieces[1::2]]
    spans = None if any("\ue000" in p for p in parts) else _align(real, parts, slots, contents)
    if spans is None:
        if any(specials.search(c) for c in contents):
            raise GenerationError("the model's chat template rewrites message text in a way jaxllm cannot follow, "
                                  "and a message holds special-token text; remove it or use another --chat template")
        return tokenizer.encode(real, parse_special=True)
    # the template text's special tokens, at their places in `real`
    ours, pos = [], 0
    for i, part in enumerate(parts):
        ours += [(pos + m.start(), m.group()) for m in specials.finditer(part)]
        pos += len(part) + (spans[i][1] - spans[i][0] if i < len(spans) else 0)
    if [(m.start(), m.group()) for m in specials.finditer(real)] == ours:
        return tokenizer.encode(real, parse_special=True)
    ids, start = [], 0
    for at, name in ours:
        ids += tokenizer.encode(real[start:at]) + [tokenizer.special_tokens[name]]
        start = at + len(name)
    return ids + tokenizer.encode(real[start:])


def end_of_turn(tokenizer) -> list[int]:
    """The ids that end an assistant's turn: the special token the template writes right after an
    assistant message (past whitespace) — "<|im_end|>", "<|eot_id|>", "<end_of_turn>", "</s>" —
    and the tokenizer's EOS. Just EOS when the template writes none there."""
    eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    specials = _specials(tokenizer)
    (mark,), _ = _sentinels(1)
    try:
        text = render(tokenizer, [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": mark}], False)
    except GenerationError:
        return eos
    at = text.find(mark)
    m = specials.match(text[at + len(mark):].lstrip()) if specials is not None and at >= 0 else None
    end = [tokenizer.special_tokens[m.group()]] if m else []
    return end + [i for i in eos if i not in end]


def _one_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
