"""Structured output: automata against Python's `re`, `json` and `jsonschema`; tables against brute force;
the masked distribution against numpy; and a random-weight model whose every constrained sample is valid."""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import re

import jax
import jax.numpy as jnp
import jsonschema
import numpy as np
import pytest

from jaxllm import generate
from jaxllm.errors import ConstraintError
from jaxllm.sampling import SamplingParams, choose_next, init_history
from jaxllm.structured import automata
from jaxllm.structured import constraints as C
from fuzzing import time_bound


class ByteTokenizer:
    """One token per byte, a few multi-byte pieces, and an empty EOS: constraints without SentencePiece."""

    def __init__(self, extra=()):
        pieces = [bytes([b]) for b in range(256)] + [p.encode() for p in extra] + [b""]
        self.pieces, self.vocab_size, self.eos_id = pieces, len(pieces), len(pieces) - 1
        self.index = {p: i for i, p in enumerate(pieces)}
        self.fingerprint = hashlib.sha256(b"\0".join(pieces)).hexdigest()[:16]
        self.strips_dummy_prefix = False
        lengths = np.array([len(p) for p in pieces], np.int32)
        table = np.zeros((len(pieces), lengths.max()), np.uint8)
        for i, p in enumerate(pieces):
            table[i, : len(p)] = list(p)
        self._bytes = (table, lengths)

    def token_bytes(self):
        return self._bytes


@jax.jit
def _advance_one(auto, rows, token, eos):
    st = C.step(auto, rows)
    ok = C.allowed(auto, rows, st, eos, jnp.full(token.shape, 10_000))
    return jnp.take_along_axis(ok, token[:, None], 1)[:, 0], ok, C.advance(auto, rows, st, token, jnp.ones_like(token, bool))


def walk(auto, rows, tokens, eos_id):
    """Feeds one token sequence (one row) -> (every token allowed, EOS allowed at the end, final rows)."""
    eos = jnp.array([eos_id])
    for t in tokens:
        ok, _, rows = _advance_one(auto, rows, jnp.array([t]), eos)
        if not bool(ok[0]):
            return False, False, rows
    ok, _, _ = _advance_one(auto, rows, jnp.array([eos_id]), eos)
    return True, bool(ok[0]), rows


def accepts(auto, rows, text: str, tok: ByteTokenizer) -> bool:
    ok, eos_ok, _ = walk(auto, rows, list(text.encode()), tok.eos_id)
    return ok and eos_ok


# ---------------------------------------------------------------------------- regex and choices


def dfa_accepts(dfa, text: str) -> bool:
    s = 0
    for b in text.encode():
        s = dfa.trans[s, b]
        if s < 0:
            return False
    return bool(dfa.accepting[s])


def dfa_sample(dfa, rng, max_len=16) -> str | None:
    """A random string the DFA accepts: a random walk that heads for acceptance half the time."""
    dist = automata.token_distances(dfa.trans, dfa.accepting)  # a byte DFA is a table of 256 one-byte tokens
    s, out = 0, []
    for _ in range(max_len):
        if dfa.accepting[s] and rng.random() < 0.3:
            break
        moves = np.nonzero(dfa.trans[s] >= 0)[0]
        closer = moves[dist[dfa.trans[s, moves]] < dist[s]]
        if not len(moves):
            break
        b = int(rng.choice(closer if len(closer) and rng.random() < 0.5 else moves))
        out.append(b)
        s = dfa.trans[s, b]
    try:
        return bytes(out).decode("utf-8") if dfa.accepting[s] else None
    except UnicodeDecodeError:
        return None


PATTERNS = [
    r"(ab|c)[0-9]{1,3}x?[^a]é", r"[a-z]+@[a-z]+\.(com|org)", r"\d{3}-\d{4}", r"(日本|é)+x",
    r"a*b*a*", r"[^\"]{2,4}", r"(yes|no|maybe)\??", r"\w+\s\w+", r".*x.", r"[\d\-]+", r"a{2,}b{,3}",
    r"(?:ab)+|c{2}", r"[\u3040-\u309f]+", r"\x41\u00e9?", r"[a\]]+", r"^a.c$", r"[^\W\d]+", r"\{[a-c]*\}",
    # found by fuzzing (tests/test_fuzz_constraints.py): octal escapes, a digit only str.isdigit takes, a surrogate
    r"\012a|\0[\01-\03]+", "a{\u0663}x?", r"x+|\ud800",
]


@pytest.mark.parametrize("pattern", PATTERNS)
def test_regex_dfa_accepts_exactly_what_python_re_fullmatches(pattern):
    dfa = automata.regex_dfa(pattern)
    rng = random.Random(0)
    alphabet = 'abcx0123@.-é日本"z comorgyesn?_\n]ぁ{},A'
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 8))) for _ in range(1500)]
    sampler = np.random.default_rng(0)
    texts += [t for t in (dfa_sample(dfa, sampler) for _ in range(300)) if t is not None]
    assert sum(bool(re.fullmatch(pattern, t, flags=re.ASCII)) for t in texts) > 50  # the check covers both answers
    for t in texts:
        assert dfa_accepts(dfa, t) == bool(re.fullmatch(pattern, t, flags=re.ASCII)), (pattern, t)


def test_choices_trie_and_bad_constraints():
    dfa = automata.choices_dfa(["yes", "no", "日本", "yesno"])
    for t, want in [("yes", True), ("no", True), ("n", False), ("日本", True), ("yesno", True), ("yesn", False), ("", False)]:
        assert dfa_accepts(dfa, t) == want
    with pytest.raises(ConstraintError):
        C.Json(max_depth=0)
    with pytest.raises(ConstraintError):
        automata.choices_dfa([])
    for bad in ("a(b", "(?=x)a", "[^é]", "*a", r"\p{L}", "a)", "[b-a]"):
        with pytest.raises(ConstraintError):
            automata.regex_dfa(bad)
    with pytest.raises(ConstraintError, match="recursive"):
        automata.schema_regex({"$defs": {"n": {"type": "array", "items": {"$ref": "#/$defs/n"}}}, "$ref": "#/$defs/n"})


@pytest.mark.parametrize("pattern", [
    "a**", "a*+", "a+?*", "a{2}{3}", "a?{2}",  # Python: "multiple repeat", or a possessive quantifier (3.11+)
    r"[\d-z]", r"a$b", r"(a$)", r"a^", r"(^a)",  # a bad range; anchors inside, which Python reads as anchors
])
def test_regexes_python_reads_otherwise_are_refused(pattern):
    with pytest.raises(ConstraintError):
        automata.regex_dfa(pattern)


def test_any_character_is_exactly_the_well_formed_utf8_ones():
    """`.` against Python's strict UTF-8 decoder: no overlong forms, surrogates or code points past U+10FFFF."""
    dfa = automata.regex_dfa(".")
    rng = random.Random(0)
    pieces = [bytes(p) for n in (1, 2) for p in itertools.product(range(256), repeat=n)]
    lead = [0xE0, 0xED, 0xEF, 0xF0, 0xF4, 0xF5, 0xC0, 0xC2]
    pieces += [bytes([rng.choice(lead)] + [rng.randrange(0x80, 0xC0) for _ in range(n - 1)]) for n in (3, 4) for _ in range(20000)]
    for piece in pieces:
        try:
            want = len(piece.decode("utf-8")) == 1 and piece != b"\n"
        except UnicodeDecodeError:
            want = False
        s = 0
        for b in piece:
            s = dfa.trans[s, b] if s >= 0 else s
        assert (s >= 0 and bool(dfa.accepting[s])) == want, piece


@pytest.mark.parametrize("pattern", ["a{100000}", "(a|b)*a(a|b){16}", "(?:(?:a{100}){100}){100}", "a{99999999999}"])
def test_regexes_past_the_size_limit_are_refused_within_seconds(pattern):
    with time_bound(30, f"compiling {pattern}"), pytest.raises(ConstraintError, match="automaton states|too large"):
        automata.regex_dfa(pattern)


def test_a_long_bounded_string_compiles_within_seconds():
    """maxLength 500 took minutes: x{0,500} was x?x?...x?, whose every subset held all the copies' starts."""
    with time_bound(30, "compiling a maxLength of 500"):
        dfa = automata.regex_dfa(automata.schema_regex({"type": "string", "maxLength": 500}))
    assert dfa_accepts(dfa, json.dumps("é" * 500)) and not dfa_accepts(dfa, json.dumps("é" * 501))


@pytest.mark.parametrize("schema,message", [
    ({"type": "string", "minLength": "x"}, "minLength"), ({"enum": 5}, "enum"), ({"properties": [1]}, "properties"),
    ({"definitions": []}, "definitions"), ({"type": None}, "type"), ({"$schema": {}}, "schema"),
    ({"enum": []}, "empty enum"), ({"type": "string", "minLength": 5, "maxLength": 2}, "minLength 5 > maxLength 2"),
    ({"type": "array", "minItems": 3, "maxItems": 1}, "minItems 3 > maxItems 1"),
])
def test_schemas_that_are_not_schemas_or_allow_nothing_fail_with_one_line(schema, message):
    """Found by fuzzing: these raised TypeError/AttributeError, or compiled ({"type": null}, an empty enum)
    into output that jsonschema then refused."""
    with pytest.raises(ConstraintError, match=message) as e:
        automata.schema_regex(schema)
    assert "\n" not in str(e.value)


def test_token_table_equals_running_each_tokens_bytes(tokenizer):
    """Brute force: every (state, token) entry equals walking the token's bytes through the byte DFA."""
    dfa = automata.regex_dfa(r"(the|of|and|[a-z]{1,3})( (the|of|and|[a-z]{1,3})){0,3}\.")
    full = C.dfa_table(dfa, tokenizer).full()
    table, lengths = tokenizer.token_bytes()
    for s in range(dfa.trans.shape[0]):
        for t in range(tokenizer.vocab_size):
            cur = s if lengths[t] else -1
            for b in table[t, : lengths[t]]:
                cur = dfa.trans[cur, b]
                if cur < 0:
                    break
            assert full[s, t] == cur, (s, t)


def test_tokenizers_that_drop_the_first_space_get_a_fresh_start_state():
    """SentencePiece models with a dummy prefix decode "▁yes" at the start as "yes"."""
    tok = ByteTokenizer([" yes", " no", "yes"])
    tok.strips_dummy_prefix = True
    auto, rows = C.build([C.Choice(["yes", "no"])], tok, tok.vocab_size)
    eos = jnp.array([tok.eos_id])
    _, ok, _ = _advance_one(auto, rows, jnp.array([tok.index[b" yes"]]), eos)
    allowed = {tok.pieces[i] for i in np.nonzero(np.asarray(ok[0]))[0]}
    assert allowed == {b" yes", b" no", b"yes", b"y", b"n", b" "}  # a lone first space decodes to nothing
    _, _, after_space = _advance_one(auto, rows, jnp.array([ord(" ")]), eos)
    _, ok, _ = _advance_one(auto, after_space, jnp.array([ord("y")]), eos)
    assert {tok.pieces[i] for i in np.nonzero(np.asarray(ok[0]))[0]} == {b"yes", b"y", b"n"}  # no second strip
    ok_piece, _, done = _advance_one(auto, rows, jnp.array([tok.index[b" yes"]]), eos)
    assert bool(ok_piece[0]) and walk(auto, done, [], tok.eos_id)[1]


def test_token_distances_are_shortest_paths():
    """The budget check's cost: fewest tokens to a goal state, against a breadth-first search."""
    rng = np.random.default_rng(3)
    table = np.where(rng.random((40, 12)) < 0.15, rng.integers(0, 40, (40, 12)), -1)
    goal = rng.random(40) < 0.1
    dist = automata.token_distances(table, goal)
    for s in range(40):
        seen, frontier, d = {s}, [s], 0
        while frontier and not goal[frontier].any():
            frontier = list({int(t) for f in frontier for t in table[f] if t >= 0} - seen)
            seen |= set(frontier)
            d += 1
        assert dist[s] == (d if frontier else automata.FAR)


# ---------------------------------------------------------------------------- JSON


def random_json(rng: random.Random, depth: int):
    kind = rng.random()
    if depth <= 0 or kind < 0.4:
        return rng.choice([
            rng.randint(-10**6, 10**6), rng.uniform(-1e3, 1e3), 1e-7, rng.random() < 0.5, None, "",
            "".join(rng.choice('ab "\\/\n\té日🎉{}[],:') for _ in range(rng.randint(0, 6))),
        ])
    if kind < 0.7:
        return [random_json(rng, depth - 1) for _ in range(rng.randint(0, 3))]
    return {rng.choice(["a", "b", "k y", "日", "{", ""]) + str(i): random_json(rng, depth - 1) for i in range(rng.randint(0, 3))}


def depth_of(v) -> int:
    if isinstance(v, dict):
        return 1 + max((depth_of(x) for x in v.values()), default=0)
    if isinstance(v, list):
        return 1 + max((depth_of(x) for x in v), default=0)
    return 0


def json_reference(text: str, max_depth: int, max_ws: int) -> bool:
    """Python's json (no NaN/Infinity), an object at the top, no trailing whitespace, bounded whitespace runs."""
    def no_constants(name):
        raise ValueError(name)

    try:
        value = json.loads(text, parse_constant=no_constants)
    except ValueError:
        return False
    runs = re.findall(r"[ \t\n\r]+", text)
    return (isinstance(value, dict) and depth_of(value) <= max_depth and text == text.rstrip(" \t\n\r")
            and all(len(r) <= max_ws for r in runs))


def test_json_mode_accepts_exactly_what_json_loads_parses():
    tok = ByteTokenizer()
    spec = C.Json(max_depth=4, max_whitespace=3)
    auto, rows = C.build([spec], tok, tok.vocab_size)
    rng = random.Random(1)
    texts = []
    for _ in range(120):
        doc = {"k": random_json(rng, 4)} if rng.random() < 0.8 else random_json(rng, 3)
        text = json.dumps(doc, ensure_ascii=rng.random() < 0.5, indent=rng.choice([None, None, 1]),
                          separators=rng.choice([(",", ":"), (", ", ": ")]))
        texts.append(text)
        for _ in range(2):  # a few edits at JSON-significant places
            i = rng.randrange(len(text) + 1)
            edit = rng.choice(['', '"', ',', '}', ']', '{', '[', ':', ' ', '0', '-', 'e', '\\', 'tru', '   '])
            texts.append(text[:i] + edit + text[i + rng.randint(0, 1):])
    texts += ['{"a":[1,2,{"b":null}]}', "{}", "[]", '{"a":01}', '{"a":1.}', '{"a":-}', '{"a":"\\u12g4"}',
              '{"a":"\\u12a4"}', '{"a":1e+5}', ' {"a":true}', '{"a":true} ', '{"a":[[[[1]]]]}', '{"a":[[[1]]]}',
              '{"a":NaN}', '{"a" : "x","b":[ ] }', '{"a":"tab\there"}', '{"a":"' + "x" * 40 + '"}']
    want = [json_reference(t, spec.max_depth, spec.max_whitespace) for t in texts]
    assert 40 < sum(want) < len(texts) - 40
    for text, expected in zip(texts, want):
        assert accepts(auto, rows, text, tok) == expected, text


def test_json_multi_token_pieces_are_allowed_exactly_when_their_bytes_are():
    """Tokens spanning several JSON tokens (`":`, `},{`...) against feeding their bytes one at a time."""
    pieces = ['":', "},{", '", "', '[{"', '"}]', "},", ',"', '{"', '"]', "]}", '": "', "1,", 'e"', ' {"']
    tok = ByteTokenizer(pieces)
    auto, rows0 = C.build([C.Json(max_depth=6)], tok, tok.vocab_size)
    eos = jnp.array([tok.eos_id])
    text = '{"a": [{"b": 1, "c": "x"}, {"d": [1, 2]}], "e": {"f": "g"}, "h": "i"}'
    rows = rows0
    checked = allowed_somewhere = 0
    for i, byte in enumerate(text.encode()):
        _, ok, _ = _advance_one(auto, rows, jnp.array([byte]), eos)
        for p in pieces:
            by_bytes, r = True, rows
            for b in p.encode():
                good, _, r = _advance_one(auto, r, jnp.array([b]), eos)
                by_bytes &= bool(good[0])
                if not by_bytes:
                    break
            pid = tok.index[p.encode()]
            assert bool(ok[0, pid]) == by_bytes, (text[:i], p)
            if by_bytes:  # and it leads to the same state as its bytes do
                _, _, via_piece = _advance_one(auto, rows, jnp.array([pid]), eos)
                assert [int(x[0]) for x in (via_piece.state, via_piece.stack, via_piece.depth)] == \
                       [int(x[0]) for x in (r.state, r.stack, r.depth)]
            checked += 1
            allowed_somewhere += by_bytes
        _, _, rows = _advance_one(auto, rows, jnp.array([byte]), eos)
    assert allowed_somewhere > 20 and checked - allowed_somewhere > 20


# ---------------------------------------------------------------------------- the distribution


def test_masked_distribution_is_the_free_one_renormalized_over_allowed_tokens():
    tok = ByteTokenizer()
    auto, rows = C.build([C.Regex(r"[a-f](x|yz)")], tok, tok.vocab_size)
    B, V = 6000, tok.vocab_size
    rng = np.random.default_rng(0)
    logits = np.tile(rng.normal(0, 2, (1, V)).astype(np.float32), (B, 1))
    rows = jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (B,)), rows)
    st = C.step(auto, rows)
    mask = C.allowed(auto, rows, st, jnp.array([tok.eos_id]), jnp.full((B,), 100))
    sp = SamplingParams.make(B, V, temperature=1.0, seed=list(range(B)))
    hist = init_history(jnp.zeros((B, 1), jnp.int32), jnp.ones((B, 1), bool), 4, V)
    token, logprobs = choose_next(jnp.where(mask, logits, -jnp.inf), sp, hist, jnp.array([tok.eos_id]))
    allowed_ids = np.array([ord(c) for c in "abcdef"])
    want = np.full(V, -np.inf)
    want[allowed_ids] = logits[0, allowed_ids] - np.log(np.exp(logits[0, allowed_ids]).sum())
    np.testing.assert_allclose(np.asarray(logprobs[0]), want, atol=1e-5)
    counts = np.bincount(np.asarray(token), minlength=V)
    assert counts[allowed_ids].sum() == B  # nothing outside the mask, ever
    expected = B * np.exp(want[allowed_ids])
    assert np.all(np.abs(counts[allowed_ids] - expected) < 5 * np.sqrt(expected) + 5)


# ---------------------------------------------------------------------------- a random model, end to end

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 8},
        "age": {"type": "integer"},
        "kind": {"enum": ["cat", "dog", None]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 3},
        "home": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 6}, "zip": {"type": "number"}},
                 "required": ["city"]},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "home"],
}
REGEX = r"[A-Z][a-z]{1,6} (is|was) [0-9]{1,3}(\.[0-9])?!"
CHOICES = ["red", "green", "blue", "日本"]


@pytest.fixture(scope="module")
def constrained(params, cfg, tokenizer):
    """200 samples at temperature 1 under each constraint, all in one batch (800 rows)."""
    specs = [C.Json(), C.JsonSchema(SCHEMA), C.Regex(REGEX), C.Choice(CHOICES)]
    return generate(params, cfg, ["x"] * 4, tokenizer=tokenizer, num_return_sequences=200, max_new_tokens=40,
                    temperature=1.0, seed=0, constraint=specs)


def test_random_model_samples_all_satisfy_their_constraints(constrained, params, cfg, tokenizer):
    texts = constrained.texts
    jsons, schemas, regexes, choices = (texts[i * 200 : (i + 1) * 200] for i in range(4))
    free = generate(params, cfg, ["x"], tokenizer=tokenizer, num_return_sequences=50, max_new_tokens=40, temperature=1.0, seed=0)
    assert sum(_parses(t) for t in free.texts) == 0  # unconstrained, the model writes garbage
    for t in jsons:
        assert isinstance(json.loads(t), dict), t
    assert len({t.strip() for t in jsons}) > 100 and sum(len(json.loads(t)) > 0 for t in jsons) > 50
    for t in schemas:
        jsonschema.validate(json.loads(t), SCHEMA)
    assert len(set(schemas)) > 150
    assert all(re.fullmatch(REGEX, t, flags=re.ASCII) for t in regexes) and len(set(regexes)) > 150
    assert set(choices) <= set(CHOICES) and len(set(choices)) == len(CHOICES)
    assert constrained.valid == [True] * 800 and constrained.errors == [None] * 800


def _parses(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def test_free_rows_in_a_constrained_batch_are_untouched_and_impossible_rows_end_with_constraint(params, cfg, tokenizer):
    prompts = ["def f(x):", "the of", "for i"]
    free = generate(params, cfg, prompts, tokenizer=tokenizer, max_new_tokens=12, temperature=0.0)
    mixed = generate(params, cfg, prompts, tokenizer=tokenizer, max_new_tokens=12, temperature=0.0,
                     constraint=[None, C.Regex("[a-z]{400}"), C.Choice(["yes", "no"])])  # 400 letters: > 12 tokens
    assert mixed.token_ids[0] == free.token_ids[0] and mixed.valid[0] is None
    assert mixed.finish_reasons[1] == "constraint" and mixed.token_ids[1] == [] and mixed.valid[1] is False
    assert mixed.texts[2] in ("yes", "no") and mixed.finish_reasons[2] == "eos"
    # other controls can take away every token the constraint allows: the row ends, no NaN, no hang
    blocked = generate(params, cfg, prompts[:1], tokenizer=tokenizer, max_new_tokens=12, temperature=1.0, seed=0, logprobs=0,
                       constraint=C.Regex("[0-9]+"), allowed_token_ids=tokenizer.encode("abc"))
    assert blocked.finish_reasons == ["constraint"] and blocked.token_ids == [[]] and blocked.logprobs == [[]]


def test_verify_only_mode_reports_invalid_rows_and_retries_fix_them(params, cfg, tokenizer):
    spec = C.Choice(["a", "b"])
    loose = generate(params, cfg, ["x"] * 3, tokenizer=tokenizer, max_new_tokens=4, temperature=1.0, seed=3,
                     constraint=spec, verify_only=True, allowed_token_ids=[tokenizer.encode("a")[0], tokenizer.encode("b")[0],
                                                                          tokenizer.eos_id])
    assert loose.valid == [t in ("a", "b") for t in loose.texts]
    assert all(e is None or "not one of" in e for e in loose.errors)
    again = generate(params, cfg, ["x"] * 3, tokenizer=tokenizer, max_new_tokens=4, temperature=1.0, seed=3,
                     constraint=spec, verify_only=True, retries=30,
                     allowed_token_ids=[tokenizer.encode("a")[0], tokenizer.encode("b")[0], tokenizer.eos_id])
    assert again.valid == [True] * 3 and all(t in ("a", "b") for t in again.texts)
    assert [again.texts[r] for r in range(3) if loose.valid[r]] == [loose.texts[r] for r in range(3) if loose.valid[r]]


def test_tables_are_cached_on_disk(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("JAXLLM_CONSTRAINT_CACHE", str(tmp_path))
    spec = C.Regex(r"[0-9]{2,5}")
    first = C.compile_table(spec, tokenizer)
    files = list(tmp_path.glob("*.npz"))
    assert len(files) == 1
    again = C.compile_table(spec, tokenizer)
    np.testing.assert_array_equal(first.full(), again.full())
    files[0].write_bytes(b"not an npz")
    np.testing.assert_array_equal(C.compile_table(spec, tokenizer).full(), first.full())  # rebuilt


# ---------------------------------------------------------------------------- beams and speculation


def test_beam_search_follows_constraints(params, cfg, tokenizer):
    from jaxllm.beam import beam_generate

    spec = C.JsonSchema(SCHEMA)
    prompts = ["def f(x):", "the of"]
    greedy = generate(params, cfg, prompts, tokenizer=tokenizer, max_new_tokens=40, temperature=0.0, constraint=spec)
    one = beam_generate(params, cfg, prompts, tokenizer=tokenizer, num_beams=1, max_new_tokens=40, constraint=spec)
    assert one.token_ids == greedy.token_ids  # width 1 is greedy, constrained the same way
    four = beam_generate(params, cfg, prompts, tokenizer=tokenizer, num_beams=4, num_return_sequences=4,
                         max_new_tokens=40, constraint=[spec, C.Choice(CHOICES)])
    for t in four.texts[:4]:
        jsonschema.validate(json.loads(t), SCHEMA)
    assert set(four.texts[4:]) <= set(CHOICES) and four.valid == [True] * 8


def test_speculative_decoding_sees_the_same_masks(params, cfg, tokenizer):
    from jaxllm import init_params
    from jaxllm.speculative import speculative_generate

    draft = jax.tree_util.tree_map(lambda x: x * 5 if x.ndim > 1 else x, init_params(cfg, jax.random.key(7)))
    specs = [C.JsonSchema(SCHEMA), C.Json(), C.Regex(REGEX)]
    prompts = ["def f(x):", "the of", "for i"]
    want = generate(params, cfg, prompts, tokenizer=tokenizer, max_new_tokens=40, temperature=0.0, constraint=specs)
    got = speculative_generate(params, cfg, draft, cfg, prompts, tokenizer=tokenizer, max_new_tokens=40,
                               temperature=0.0, constraint=specs, num_speculative_tokens=3)
    assert got.token_ids == want.token_ids  # greedy: exactly the target's own constrained output
    sampled = speculative_generate(params, cfg, draft, cfg, prompts * 8, tokenizer=tokenizer, max_new_tokens=40,
                                   temperature=1.0, seed=2, constraint=specs * 8, num_speculative_tokens=3)
    assert sampled.valid == [True] * 24, sampled.errors


def test_constraints_run_past_the_context_with_a_ring_cache(params, cfg, tokenizer):
    """The mask sits in the shared decode step: window + sinks + an int8 cache change nothing about validity."""
    n = cfg.max_seq_len + 100
    out = generate(params, cfg, ["x", "def f"], tokenizer=tokenizer, max_new_tokens=n, temperature=1.0, seed=5,
                   constraint=[C.Json(), C.Regex("[a-z ]{600,}!")], window=32, sinks=4, kv_cache_dtype="int8")
    assert out.valid == [True, True], out.errors
    assert len(out.texts[1]) > 600 and len(out.token_ids[1]) + 3 > cfg.max_seq_len  # past the context
