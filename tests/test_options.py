"""README's mode × option table, checked cell by cell: every sample.py option either works in a
decoding mode (sampling, beam search, speculative decoding) or is refused there with exit code 2
and one line naming both sides. Nothing is silently ignored.

The claims come from README.md (parsed here); what "works" means for each option is stated
below, independently of the implementation: a property of the output that holds only if the
option was honoured (greedy output equal to a numpy greedy decode, tokens inside an allow-list,
text that parses as JSON, ...). A few options only change how the work is done (the cache
layout, the backend, the compile cache); for them "works" is "accepted, and the output is
still well formed" (their effect is tested in test_long_context.py, test_attention.py, ...).

sample.py runs in this process (`main(argv)`); one prompt and a few tokens keep it quick.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field

import jax
import pytest

from jaxllm import save_checkpoint
from conftest import REPO
from fuzzing import run_cli
from reference import np_greedy

sys.path.insert(0, str(REPO))
import sample  # noqa: E402  (the CLI script lives at the repository root)

MODES = ("sample", "beam", "speculative", "lookup")
PROMPT = "def f(x):"
N = 6  # tokens per output
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


def readme_table() -> dict[str, dict[str, str]]:
    """README's "Every option in every mode" table -> {flag: {mode: "works" | "refused"}}."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    start = text.index("| option | sample | beam")
    table = {}
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        flag = re.fullmatch(r"`(--\w+)`", cells[0]).group(1)
        table[flag] = {mode: cell.split()[0] for mode, cell in zip(MODES, cells[1:])}
    return table


TABLE = readme_table()


@dataclass
class Outcome:
    rc: int
    out: str
    err: str
    rows: list = field(default_factory=list)  # jsonl records

    def tokens(self, i: int = 0) -> list[int]:
        return self.rows[i]["token_ids"]

    def text(self, i: int = 0) -> str:
        return self.rows[i]["text"]


@pytest.fixture(scope="module")
def files(cfg, params, tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("options")
    save_checkpoint(root / "ckpt", params, cfg, tokenizer)
    save_checkpoint(root / "draft", {**params, "layers": jax.tree_util.tree_map(lambda x: x[:1], params["layers"])},
                    cfg.replace(n_layers=1), tokenizer)
    (root / "prompt.txt").write_text("class Foo:", encoding="utf-8")
    (root / "few_shot.jsonl").write_text('{"input": "1+1", "output": "2"}\n', encoding="utf-8")
    (root / "schema.json").write_text(json.dumps(SCHEMA), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def world(files, cfg, params, tokenizer):
    """What every check may look at: files, the tokenizer, a numpy greedy decode, and each mode's
    output without the option (computed once per mode)."""
    ids = tokenizer.encode(PROMPT, add_bos=True)
    return dict(files=files, tokenizer=tokenizer, prompt_ids=ids, bases={},
                greedy=np_greedy(params, cfg, ids, N, eos=[tokenizer.eos_id]))


def mode_flags(mode: str, files) -> list[str]:
    return {"sample": ["--seed", "0"], "beam": ["--num_beams", "2"], "speculative": ["--draft", str(files / "draft"), "--seed", "0"],
            "lookup": ["--prompt_lookup_max", "3", "--seed", "3"]}[mode]


def cli(argv: list[str], capsys) -> Outcome:
    rc, out, err = run_cli(sample.main, argv, capsys)
    jsonl = rc == 0 and out.startswith("{")  # else text output
    return Outcome(rc, out, err, [json.loads(line) for line in out.splitlines()] if jsonl else [])


def run_mode(world, mode: str, extra: list[str], capsys) -> Outcome:
    files = world["files"]
    argv = ["--checkpoint", str(files / "ckpt"), "--prompt", PROMPT, "--max_new_tokens", str(N), "--format", "jsonl",
            "--no_compile_cache", *mode_flags(mode, files), *extra]
    return cli(argv, capsys)


def base(world, mode: str, capsys) -> Outcome:
    if mode not in world["bases"]:
        got = run_mode(world, mode, [], capsys)
        assert got.rc == 0 and got.rows, got.err
        world["bases"][mode] = got
    return world["bases"][mode]


def reusable_token(world, tokens: list[int]) -> int:
    """A generated token whose text encodes back to that one token (so banning the text bans it)."""
    tok = world["tokenizer"]
    return next(t for t in tokens if tok.encode(tok.decode([t])) == [t])


def repeats(tokens) -> bool:
    return len(set(tokens)) < len(tokens)


def nesting(value) -> int:
    if isinstance(value, dict):
        return 1 + max(map(nesting, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(nesting, value), default=0)
    return 0


# ---------------------------------------------------------------------------- what "works" means
# flag -> (extra argv given the mode's output without it, check(world, mode, base, got))
# The output without the option ("base") is sampled at temperature 1.0 with seed 0 (beam search:
# its best hypothesis); the checks say what only an honoured option produces.


def same_tokens(w, mode, b, got):
    return got.tokens() == b.tokens()


def greedy(w, mode, b, got):
    return got.tokens() == w["greedy"][: len(got.tokens())] and (len(got.tokens()) == N or got.rows[0]["finish_reason"] == "eos")


def differs(w, mode, b, got):
    return got.tokens() != b.tokens()


# Only tokens 100 and 101 may come, 100 by far the likelier: without a penalty on tokens already
# generated every token is 100; with it, the second token is 101.
TWO_TOKENS = ["--allowed_token_ids", "100,101", "--logit_bias", "100=50", "--logit_bias", "101=40"]


def second_differs(w, mode, b, got):
    return got.tokens()[0] != got.tokens()[1]


def stop_at(include: bool):
    def check(w, mode, b, got):
        s = stop_string(b)
        if mode == "beam":  # the search may rank another hypothesis first: no text runs past the stop string
            return s not in got.text()[: len(got.text()) - (len(s) if include else 0)]
        cut = b.text().index(s) + (len(s) if include else 0)
        return got.text() == b.text()[:cut] and got.rows[0]["finish_reason"] == "stop"
    return check


def stop_string(b: Outcome) -> str:
    """Two letters the output holds (not at its very start), as a stop string."""
    found = re.search(r"(?<=.)[A-Za-z]{2}", b.text(), flags=re.S)
    assert found, b.text()
    return found.group(0)


def eos_second(w, mode, b, got):
    if mode == "beam":  # another hypothesis may rank first; none runs past the EOS
        return b.tokens()[1] not in got.tokens()[:-1]
    return got.tokens() == b.tokens()[:2] and got.rows[0]["finish_reason"] == "eos"


PROBES = {
    "--max_new_tokens": (lambda w, b: ["--max_new_tokens", "3"], lambda w, m, b, got: len(got.tokens()) <= 3 < len(b.tokens())),
    "--num_return_sequences": (lambda w, b: ["--num_return_sequences", "2"], lambda w, m, b, got: len(got.rows) == 2),
    "--temperature": (lambda w, b: ["--temperature", "0"], greedy),
    "--top_k": (lambda w, b: ["--top_k", "1"], greedy),
    "--top_p": (lambda w, b: ["--top_p", "0.0001"], greedy),
    "--min_p": (lambda w, b: ["--min_p", "1"], greedy),
    "--repetition_penalty": (lambda w, b: [*TWO_TOKENS, "--repetition_penalty", "1e9"], second_differs),
    "--presence_penalty": (lambda w, b: [*TWO_TOKENS, "--presence_penalty", "100"], second_differs),
    "--frequency_penalty": (lambda w, b: [*TWO_TOKENS, "--frequency_penalty", "100"], second_differs),
    "--no_repeat_ngram_size": (lambda w, b: ["--no_repeat_ngram_size", "1"],
                               lambda w, m, b, got: not repeats(w["prompt_ids"] + got.tokens())),
    "--min_new_tokens": (lambda w, b: ["--eos_token_id", str(b.tokens()[0]), "--min_new_tokens", "3"],
                         lambda w, m, b, got: b.tokens()[0] not in got.tokens()[:3]),
    "--logit_bias": (lambda w, b: ["--logit_bias", "100=100"], lambda w, m, b, got: set(got.tokens()) == {100}),
    "--allowed_token_ids": (lambda w, b: ["--allowed_token_ids", "100,101"], lambda w, m, b, got: set(got.tokens()) <= {100, 101}),
    "--bad_words": (lambda w, b: ["--bad_words", w["tokenizer"].decode([reusable_token(w, b.tokens())])],
                    lambda w, m, b, got: reusable_token(w, b.tokens()) not in got.tokens()),
    "--seed": (lambda w, b: ["--seed", "1"], differs),
    "--stop": (lambda w, b: ["--stop", stop_string(b)], stop_at(include=False)),
    "--include_stop_str_in_output": (lambda w, b: ["--stop", stop_string(b), "--include_stop_str_in_output"], stop_at(include=True)),
    "--eos_token_id": (lambda w, b: ["--eos_token_id", str(b.tokens()[1])], eos_second),
    "--stop_on_repetition": (lambda w, b: ["--allowed_token_ids", "100", "--stop_on_repetition", "2"],
                             lambda w, m, b, got: got.rows[0]["finish_reason"] == "repetition"),
    "--logprobs": (lambda w, b: ["--logprobs", "2"], lambda w, m, b, got: len(got.rows[0]["logprobs"]) == len(got.tokens())
                   and all(lp <= 0 for lp in got.rows[0]["logprobs"]) and all(len(a) == 2 for a in got.rows[0]["top_logprobs"])),
    "--stream": (lambda w, b: ["--stream", "--format", "text"], lambda w, m, b, got: got.out == PROMPT + b.text() + "\n"),
    "--json": (lambda w, b: ["--json"], lambda w, m, b, got: isinstance(json.loads(got.text()), dict)),
    "--json_schema": (lambda w, b: ["--json_schema", str(w["files"] / "schema.json"), "--max_new_tokens", "16"],
                      lambda w, m, b, got: type(json.loads(got.text())["a"]) is int),
    "--regex": (lambda w, b: ["--regex", "[0-9]{2}"], lambda w, m, b, got: re.fullmatch("[0-9]{2}", got.text()) is not None),
    "--choice": (lambda w, b: ["--choice", "yes", "--choice", "no"], lambda w, m, b, got: got.text() in ("yes", "no")),
    "--max_json_depth": (lambda w, b: ["--json", "--max_json_depth", "1"],
                         lambda w, m, b, got: nesting(json.loads(got.text())) == 1),
    # not enforced: the same text as without the constraint, reported invalid
    "--verify_only": (lambda w, b: ["--regex", "[0-9]{2}", "--verify_only"],
                      lambda w, m, b, got: got.text() == b.text() and got.rows[0]["valid"] is False),
    # 40 digits do not fit in N tokens: the output is invalid, so it is sampled once more
    "--retries": (lambda w, b: ["--regex", "[0-9]{40}", "--retries", "1"],
                  lambda w, m, b, got: got.rows[0]["timing"]["retries"] == 1 and not got.rows[0]["valid"]),
    "--length_penalty": (lambda w, b: ["--length_penalty", "3"], lambda w, m, b, got: got.rows[0]["score"] != b.rows[0]["score"]),
    "--early_stopping": (lambda w, b: ["--early_stopping", "true"], lambda w, m, b, got: got.rows[0]["score"] <= 0),
    # one token allowed: every draft is accepted, so a target forward keeps G + 1 tokens: with G = 2,
    # 3 then 2 of the 5 after the first (the default G = 4 would keep all 5 in one)
    "--num_speculative_tokens": (lambda w, b: ["--allowed_token_ids", "100", "--num_speculative_tokens", "2"],
                                 lambda w, m, b, got: got.rows[0]["timing"]["tokens_per_block"] == 2.5),
    "--window": (lambda w, b: ["--window", "8"], lambda w, m, b, got: len(got.tokens()) <= N),
    "--sinks": (lambda w, b: ["--window", "8", "--sinks", "2"], lambda w, m, b, got: len(got.tokens()) <= N),
    "--prefill_chunk": (lambda w, b: ["--prefill_chunk", "2"], same_tokens),
    "--kv_cache_dtype": (lambda w, b: ["--kv_cache_dtype", "int8"], lambda w, m, b, got: len(got.tokens()) <= N),
    "--chat": (lambda w, b: ["--chat"], lambda w, m, b, got: got.rows[0]["num_prompt_tokens"] > b.rows[0]["num_prompt_tokens"]),
    "--system": (lambda w, b: ["--system", "Be brief."],
                 lambda w, m, b, got: got.rows[0]["num_prompt_tokens"] > b.rows[0]["num_prompt_tokens"]),
    "--few_shot": (lambda w, b: ["--few_shot", str(w["files"] / "few_shot.jsonl")],
                   lambda w, m, b, got: got.rows[0]["num_prompt_tokens"] > b.rows[0]["num_prompt_tokens"]),
    "--checkpoint": (lambda w, b: ["--checkpoint", str(w["files"] / "ckpt")], same_tokens),
    "--prompt": (lambda w, b: ["--prompt", "for i"], lambda w, m, b, got: [r["prompt"] for r in got.rows] == [PROMPT, "for i"]),
    "--prompt_file": (lambda w, b: ["--prompt_file", str(w["files"] / "prompt.txt")],
                      lambda w, m, b, got: [r["prompt"] for r in got.rows] == [PROMPT, "class Foo:"]),
    "--format": (lambda w, b: ["--format", "text"], lambda w, m, b, got: got.out == PROMPT + b.text() + "\n"),
    "--quantize": (lambda w, b: ["--quantize", "int8"], lambda w, m, b, got: len(got.tokens()) <= N),
    "--group_size": (lambda w, b: ["--quantize", "int4", "--group_size", "32"], lambda w, m, b, got: len(got.tokens()) <= N),
    "--attention_impl": (lambda w, b: ["--attention_impl", "xla"], same_tokens),
    "--warmup": (lambda w, b: ["--warmup"], lambda w, m, b, got: got.rows[0]["timing"]["compile_s"] == 0),
    "--verbose": (lambda w, b: ["--verbose"], lambda w, m, b, got: "programs compiled or loaded" in got.err),
    "--no_compile_cache": (lambda w, b: ["--no_compile_cache"], same_tokens),
}
MODE_FLAG = {"beam": "--num_beams", "speculative": "--draft", "lookup": "--prompt_lookup_max"}


def test_the_table_lists_every_flag_and_each_cell_says_works_or_refused():
    shown = set(re.findall(r"(--[a-z][a-z0-9_]*)(?![\w-])", sample.parser().format_help()))  # hyphenated aliases aside
    assert set(TABLE) == shown - {"--help", "--n", *MODE_FLAG.values()}  # --n is --num_return_sequences
    assert set(TABLE) == set(PROBES)
    assert {claim for row in TABLE.values() for claim in row.values()} == {"works", "refused"}


@pytest.mark.parametrize("flag,mode", [(f, m) for f in TABLE for m in MODES])
def test_each_option_works_in_a_mode_or_is_refused_naming_both_sides(world, capsys, flag, mode):
    argv_of, check = PROBES[flag]
    b = base(world, mode, capsys)
    extra = argv_of(world, b)
    got = run_mode(world, mode, extra, capsys)
    if TABLE[flag][mode] == "refused":
        lines = got.err.splitlines()
        assert got.rc == 2 and len(lines) == 1 and lines[0].startswith("sample.py: error: "), got.err
        # the option, or a flag it needs that this mode refuses too (--sinks comes with a --window)
        refused_here = [f for f in extra if TABLE.get(f, {}).get(mode) == "refused"]
        assert flag in refused_here and any(f in lines[0] for f in refused_here) and got.out == "", lines[0]
        others = [MODE_FLAG[mode]] if mode != "sample" else list(MODE_FLAG.values())
        assert any(other in lines[0] for other in others), lines[0]  # the other side of the conflict
        return
    assert got.rc == 0, got.err
    assert check(world, mode, b, got), (flag, mode, got.out, got.err)
