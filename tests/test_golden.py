"""Golden output: the bundled model's greedy continuations of a few prompts, pinned.

The bundled model (jaxllm/assets/default, what sample.py runs without --checkpoint) is loaded
as sample.py loads it and continued greedily; the token ids, texts and finish reasons must
equal tests/golden/bundled_greedy.json. A change to numerics, the tokenizer, the decode loop or
the stored weights that moves a single token shows up here. Such a change must say why in its
commit; then rewrite the file with

    JAXLLM_UPDATE_GOLDEN=1 python -m pytest -q tests/test_golden.py

The file is not just a copy of `generate`'s output: the same continuations are derived a second
way, by `model.forward` over the whole growing sequence (no cache, no sampling chain, no
buckets) and an argmax, and must agree with it too. The prompts were chosen for a wide
argmax margin at every step (the file records the smallest, in logits), so a bfloat16
rounding difference between machines does not flip a token.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import jax
import numpy as np
import pytest

import jaxllm
from jaxllm.checkpoint import load_any
from jaxllm.model import forward

REPO = Path(__file__).resolve().parent.parent
BUNDLED = REPO / "jaxllm" / "assets" / "default"  # what sample.py runs without --checkpoint
GOLDEN = REPO / "tests" / "golden" / "bundled_greedy.json"
UPDATE = os.environ.get("JAXLLM_UPDATE_GOLDEN") == "1"
PROMPTS = ["    return", "Hello, world", "class Error(Exception):\n", "class Stack:\n    def __init__(self):"]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def bundled():
    params, cfg, tokenizer, _ = load_any(BUNDLED)  # as sample.py loads a checkpoint
    return params, cfg, tokenizer


@pytest.fixture(scope="module")
def generated(bundled):
    params, cfg, tokenizer = bundled
    return jaxllm.generate(params, cfg, PROMPTS, tokenizer=tokenizer, max_new_tokens=NEW_TOKENS, temperature=0.0)


def full_forward_greedy(params, cfg, prompts_ids: list[list[int]], steps: int, eos: int) -> tuple[list[list[int]], list[float]]:
    """Greedy continuations by re-running `forward` over each whole sequence, no cache.

    All rows in one right-padded [B, T] block (padding at position -1, after every real token,
    so it changes nothing a real token sees): one compiled program for every step.
    -> (continuations, each row's smallest top-1 minus top-2 logit gap)
    """
    T = max(map(len, prompts_ids)) + steps
    step = jax.jit(lambda tokens, positions: forward(params, cfg, tokens, positions)[0])
    seqs = [list(p) for p in prompts_ids]
    done = [False] * len(seqs)
    margins = [np.inf] * len(seqs)
    for _ in range(steps):
        tokens = np.zeros((len(seqs), T), np.int32)
        positions = np.full((len(seqs), T), -1, np.int32)
        for r, s in enumerate(seqs):
            tokens[r, : len(s)], positions[r, : len(s)] = s, np.arange(len(s))
        logits = np.asarray(step(tokens, positions))
        for r, s in enumerate(seqs):
            if done[r]:
                continue
            z = logits[r, len(s) - 1]
            top2 = np.sort(z)[-2:]
            margins[r] = min(margins[r], float(top2[1] - top2[0]))
            s.append(int(np.argmax(z)))
            done[r] = s[-1] == eos
    return [s[len(p) :] for s, p in zip(seqs, prompts_ids)], margins


@pytest.fixture(scope="module")
def golden(bundled, generated):
    if UPDATE:
        params, cfg, tokenizer = bundled
        prompt_ids = [tokenizer.encode(p, add_bos=True) for p in PROMPTS]
        _, margins = full_forward_greedy(params, cfg, prompt_ids, NEW_TOKENS, tokenizer.eos_id)
        rows = [
            {"prompt": p, "prompt_ids": ids, "token_ids": out, "text": text, "finish_reason": why, "min_margin": round(m, 4)}
            for p, ids, out, text, why, m in zip(
                PROMPTS, prompt_ids, generated.token_ids, generated.texts, generated.finish_reasons, margins
            )
        ]
        note = ("Greedy continuations of the bundled model (tests/test_golden.py). A change that alters them must say "
                "why in its commit; regenerate with JAXLLM_UPDATE_GOLDEN=1 python -m pytest -q tests/test_golden.py.")
        doc = {"note": note, "model": "jaxllm/assets/default", "max_new_tokens": NEW_TOKENS, "temperature": 0.0, "rows": rows}
        text = json.dumps(doc, indent=2, ensure_ascii=False)
        text = re.sub(r"\[[\d,\s]+\]", lambda m: json.dumps(json.loads(m.group(0))), text)  # an id list on one line
        GOLDEN.write_text(text + "\n", encoding="utf-8")
    return json.loads(GOLDEN.read_text(encoding="utf-8"))


def test_the_golden_file_covers_the_prompts_the_test_runs(golden):
    assert [row["prompt"] for row in golden["rows"]] == PROMPTS
    assert golden["max_new_tokens"] == NEW_TOKENS


def test_the_tokenizer_splits_the_prompts_as_pinned(bundled, golden):
    tokenizer = bundled[2]
    for row in golden["rows"]:
        assert tokenizer.encode(row["prompt"], add_bos=True) == row["prompt_ids"], row["prompt"]


def test_greedy_generation_of_the_bundled_model_is_pinned(generated, golden):
    rows = golden["rows"]
    assert generated.token_ids == [row["token_ids"] for row in rows]
    assert generated.texts == [row["text"] for row in rows]
    assert generated.finish_reasons == [row["finish_reason"] for row in rows]


def test_the_pinned_tokens_are_the_full_forward_argmax(bundled, golden):
    params, cfg, tokenizer = bundled
    rows = golden["rows"]
    derived, _ = full_forward_greedy(params, cfg, [row["prompt_ids"] for row in rows], NEW_TOKENS, tokenizer.eos_id)
    for row, ids in zip(rows, derived):
        assert ids == row["token_ids"], row["prompt"]
        assert tokenizer.decode(ids, after=row["prompt_ids"]) == row["text"]
