"""Chat templates and few-shot prompts: rendered ids equal independently written reference strings."""

from __future__ import annotations

import json

import pytest

from jaxllm import GenerationError
from jaxllm.chat import apply_chat_template, build_prompt, end_of_turn, load_few_shot

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi <|user|> there"},  # a typed marker stays text
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Bye"},
]


def test_jaxllm_template(tokenizer):
    ids = apply_chat_template(tokenizer, MESSAGES, "jaxllm")
    sp = tokenizer.special_tokens
    assert tokenizer.decode(ids, skip_special=False) == (
        "<s><|system|>Be brief.<|end|>\n<|user|>Hi <|user|> there<|end|>\n<|assistant|>Hello.<|end|>\n"
        "<|user|>Bye<|end|>\n<|assistant|>"
    )
    assert ids.count(sp["<|user|>"]) == 2  # the marker the user typed is not an id
    assert ids[-1] == sp["<|assistant|>"]
    assert end_of_turn(tokenizer, "auto") == ([sp["<|end|>"]], [])


def test_llama2_template(tokenizer):
    ids = apply_chat_template(tokenizer, MESSAGES, "llama2")
    assert tokenizer.decode(ids, skip_special=False) == (
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi <|user|> there [/INST] Hello. </s><s>[INST] Bye [/INST]"
    )
    assert ids.count(tokenizer.bos_id) == 2 and ids.count(tokenizer.eos_id) == 1


def test_plain_template(tokenizer):
    ids = apply_chat_template(tokenizer, MESSAGES, "plain")
    assert tokenizer.decode(ids) == "Be brief.\n\nUser: Hi <|user|> there\nAssistant: Hello.\n\nUser: Bye\nAssistant:"
    assert end_of_turn(tokenizer, "plain")[1] == ["\nUser:"]


def test_few_shot_file_becomes_turns(tokenizer, tmp_path):
    path = tmp_path / "shots.jsonl"
    path.write_text(json.dumps({"input": "2+2", "output": "4"}) + "\n\n" + json.dumps({"question": "3+3", "answer": "6"}) + "\n")
    shots = load_few_shot(path)
    assert shots == [{"role": "user", "content": "2+2"}, {"role": "assistant", "content": "4"},
                     {"role": "user", "content": "3+3"}, {"role": "assistant", "content": "6"}]
    ids = build_prompt(tokenizer, "5+5", system="Add.", few_shot=shots, template="plain")
    assert tokenizer.decode(ids) == "Add.\n\nUser: 2+2\nAssistant: 4\n\nUser: 3+3\nAssistant: 6\n\nUser: 5+5\nAssistant:"


@pytest.mark.parametrize("content,message", [
    ("not json\n", "not valid JSON"), ('{"x": 1}\n', "needs string fields"), ("\n", "no examples"),
])
def test_bad_few_shot_files(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(GenerationError, match=message):
        load_few_shot(path)
    with pytest.raises(GenerationError, match="cannot read"):
        load_few_shot(tmp_path / "missing.jsonl")


def test_bad_messages_and_templates(tokenizer):
    with pytest.raises(GenerationError, match="role"):
        apply_chat_template(tokenizer, [{"role": "robot", "content": "x"}])
    with pytest.raises(GenerationError, match="system message may only come first"):
        apply_chat_template(tokenizer, [{"role": "user", "content": "x"}, {"role": "system", "content": "y"}])
    with pytest.raises(GenerationError, match="chat template"):
        apply_chat_template(tokenizer, MESSAGES, "chatml")
