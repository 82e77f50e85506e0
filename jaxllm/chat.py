"""Guided prompts: chat templates, system prompts and few-shot examples, turned into prompt ids.

Templates are built as ids, not as one string to encode: the role markers are inserted as
their special ids, and the users' text is encoded as plain text, so a user who types
"<|user|>" or "[/INST]" cannot forge a turn. The model's own Jinja template ("model") keeps that
promise too: its rendered text is split into the template's part and the messages' (see
jaxllm.chat_jinja).

    jaxllm   <s><|system|>S<|end|>\\n<|user|>U<|end|>\\n<|assistant|>A<|end|>\\n … <|assistant|>
    llama2   <s>[INST] <<SYS>>\\nS\\n<</SYS>>\\n\\nU [/INST] A </s><s>[INST] U [/INST]
    model    the model's own Jinja `chat_template` (tokenizer_config.json or chat_template.jinja),
             as Qwen2, Llama 3, Gemma, Mistral and TinyLlama chat models ship it (jaxllm.chat_jinja)
    plain    S\\n\\nUser: U\\nAssistant: A\\n\\nUser: U\\nAssistant:       (models without chat tokens)

"auto" picks jaxllm when the tokenizer has jaxllm's markers, else model when it carries a
chat_template, else plain.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

from jaxllm.errors import GenerationError
from jaxllm.tokenizer import Tokenizer

# The --chat choices: "auto" picks one of the others for the tokenizer (resolve_template); "model"
# is the tokenizer's own chat_template, rendered to ids in jaxllm.chat_jinja.
TEMPLATES = ("auto", "jaxllm", "llama2", "plain", "model")
JAXLLM_MARKERS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
ROLES = ("system", "user", "assistant")
# Keys accepted for one few-shot example in a JSONL file (first match wins).
FEW_SHOT_KEYS = (("input", "output"), ("user", "assistant"), ("prompt", "completion"), ("question", "answer"))


def resolve_template(tokenizer: Tokenizer, template: str = "auto") -> str:
    """'auto' is the jaxllm template when the tokenizer has its markers, else the model's own
    (its chat_template) when it has one, else plain text."""
    if template not in TEMPLATES:
        raise GenerationError(f"chat template must be one of {', '.join(TEMPLATES)}, got {template!r}")
    if template == "auto":
        if all(m in tokenizer.special_tokens for m in JAXLLM_MARKERS):
            return "jaxllm"
        return "model" if tokenizer.chat_template else "plain"
    if template == "model" and not tokenizer.chat_template:
        raise GenerationError("the model chat template needs a tokenizer with a chat_template "
                              "(tokenizer_config.json or chat_template.jinja); this one has none")
    if template == "jaxllm":
        missing = [m for m in JAXLLM_MARKERS if m not in tokenizer.special_tokens]
        if missing:
            raise GenerationError(f"the jaxllm chat template needs special tokens the tokenizer lacks: {', '.join(missing)}")
    if template == "llama2" and (tokenizer.bos_id is None or tokenizer.eos_id is None):
        raise GenerationError("the llama2 chat template needs a tokenizer with BOS and EOS ids")
    return template


def _check(messages: Sequence[Mapping[str, str]]) -> list[tuple[str, str]]:
    turns = []
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if role not in ROLES or not isinstance(content, str):
            raise GenerationError(f"message {i} needs a role in {ROLES} and text content, got {dict(m)!r}")
        if role == "system" and i != 0:
            raise GenerationError("a system message may only come first")
        turns.append((role, content))
    return turns


def apply_chat_template(
    tokenizer: Tokenizer, messages: Sequence[Mapping[str, str]], template: str = "auto", add_generation_prompt: bool = True
) -> list[int]:
    """messages: [{"role": "system"|"user"|"assistant", "content": str}, ...] -> prompt ids.

    With `add_generation_prompt`, the ids end where the assistant's next turn begins.
    """
    template = resolve_template(tokenizer, template)
    turns = _check(messages)
    text = lambda s: tokenizer.encode(s)
    ids: list[int] = []
    if template == "model":
        from jaxllm import chat_jinja

        ids = chat_jinja.encode(tokenizer, [{"role": r, "content": c} for r, c in turns], add_generation_prompt)
    elif template == "jaxllm":
        special = tokenizer.special_tokens
        ids += [tokenizer.bos_id] if tokenizer.bos_id is not None else []
        for role, content in turns:
            ids += [special[f"<|{role}|>"]] + text(content) + [special["<|end|>"]] + text("\n")
        if add_generation_prompt:
            ids.append(special["<|assistant|>"])
    elif template == "llama2":
        system = turns[0][1] if turns and turns[0][0] == "system" else None
        turns = turns[1:] if system is not None else turns
        for i, (role, content) in enumerate(turns):
            if role == "user":
                if system is not None and i == 0:
                    content = f"<<SYS>>\n{system}\n<</SYS>>\n\n{content}"
                ids += [tokenizer.bos_id] + text(f"[INST] {content.strip()} [/INST]")
            else:
                ids += text(f" {content.strip()} ") + [tokenizer.eos_id]
    else:  # plain
        parts = []
        for role, content in turns:
            parts.append(content + "\n\n" if role == "system" else f"{'User' if role == 'user' else 'Assistant'}: {content}\n")
            if role == "assistant":
                parts.append("\n")
        if add_generation_prompt:
            parts.append("Assistant:")
        ids = ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + text("".join(parts))
    return ids


def end_of_turn(tokenizer: Tokenizer, template: str) -> tuple[list[int], list[str]]:
    """The ids and stop strings that end an assistant's turn in this template."""
    template = resolve_template(tokenizer, template)
    if template == "model":
        from jaxllm import chat_jinja

        return chat_jinja.end_of_turn(tokenizer), []
    if template == "jaxllm":
        return [tokenizer.special_tokens["<|end|>"]], []
    if template == "llama2":
        return [tokenizer.eos_id], []
    return ([tokenizer.eos_id] if tokenizer.eos_id is not None else []), ["\nUser:"]


def load_few_shot(path: str | Path) -> list[dict[str, str]]:
    """A JSONL file of examples -> alternating user/assistant messages.

    Each line is an object with one of the key pairs input/output, user/assistant,
    prompt/completion or question/answer.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise GenerationError(f"cannot read few-shot file {path}: {e.strerror if isinstance(e, OSError) else e}") from None
    messages = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            example = json.loads(line)
        except json.JSONDecodeError as e:
            raise GenerationError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        keys = next((k for k in FEW_SHOT_KEYS if isinstance(example, dict) and all(isinstance(example.get(x), str) for x in k)), None)
        if keys is None:
            raise GenerationError(f"{path}:{n}: an example needs string fields {' / '.join('+'.join(k) for k in FEW_SHOT_KEYS)}")
        messages += [{"role": "user", "content": example[keys[0]]}, {"role": "assistant", "content": example[keys[1]]}]
    if not messages:
        raise GenerationError(f"few-shot file {path} holds no examples")
    return messages


def build_prompt(
    tokenizer: Tokenizer, prompt: str, *, system: str | None = None, few_shot: Sequence[Mapping[str, str]] = (), template: str = "auto"
) -> list[int]:
    """System prompt + few-shot turns + the user's prompt, rendered with a chat template."""
    messages = ([{"role": "system", "content": system}] if system else []) + list(few_shot)
    return apply_chat_template(tokenizer, messages + [{"role": "user", "content": prompt}], template)
