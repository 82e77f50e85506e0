"""Fuzzing constraints (issue #16, item 9): random regexes and JSON Schemas either compile or raise
one `ConstraintError` line, within a time bound; what compiles means what Python's `re` and
`jsonschema` say it means; and a short constrained generation ends valid, or with the finish
reason "constraint". The outcome rule is in tests/fuzzing.py.

The oracles are independent of jaxllm's automata: `re.fullmatch` (the documented meaning of a
regex), `json.loads` + `jsonschema` (of a schema), and strict UTF-8 decoding (what a DFA over
bytes may accept). Strings to check come from random walks over the DFA, from hypothesis's
`from_regex` (strings Python matches) and from random text.
"""

from __future__ import annotations

import json
import os
import re
import tempfile

import jsonschema
import numpy as np
import pytest
from hypothesis import event, given, strategies as st

from jaxllm import generate
from jaxllm.errors import ConstraintError
from jaxllm.stopping import FINISH_REASONS
from jaxllm.structured import automata
from jaxllm.structured import constraints as C
from fuzzing import check_api_error, fuzz_settings, one_in, partial_files, time_bound

COMPILE_BOUND_S = 30  # host-side compile of one pattern or schema (a busy 2-core machine)
GENERATE_BOUND_S = 120  # one constrained generation, its table and programs compiled


# ---------------------------------------------------------------------------- regexes

CHARS = list("ab01 _-.,:") + ["é", "日", "🎉", "\n", "\t", "٣"]  # ٣: a digit to str.isdigit, not to re
SPECIAL = list(".^$*+?{}[]()|\\-")
ESCAPES = [r"\d", r"\w", r"\s", r"\D", r"\W", r"\S", r"\n", r"\t", r"\0", r"\x41", r"\xe9", r"\u00e9", r"\u65e5",
           r"\ud800", r"\udfff", r"\01", r"\b", r"\Z", r"\1", r"\p"]


def counts():
    """Repetition bounds: mostly small, sometimes large enough to test the size limits."""
    return st.integers(0, 4) | st.sampled_from([16, 100, 1000, 10**5])


def quantifier():
    lo_hi = st.tuples(counts(), counts()).map(sorted)
    q = st.sampled_from(["*", "+", "?"]) | counts().map(lambda n: f"{{{n}}}") | counts().map(lambda n: f"{{{n},}}") \
        | counts().map(lambda n: f"{{,{n}}}") | lo_hi.map(lambda b: f"{{{b[0]},{b[1]}}}") | st.just("{3,1}")
    return st.tuples(q, st.sampled_from(["", "", "", "?", "+"]), st.sampled_from(["", "", "", "", "*", "{2}"])).map("".join)


def char_class():
    item = st.sampled_from(CHARS + [re.escape(c) for c in "]\\^-"] + ESCAPES[:10]) \
        | st.tuples(st.sampled_from("a0é\x00 "), st.sampled_from("z9ê\x7f日")).map("-".join) | st.sampled_from([r"\d-z", "a-\\d"])
    return st.tuples(st.sampled_from(["", "^"]), st.lists(item, min_size=1, max_size=4)).map(lambda t: f"[{t[0]}{''.join(t[1])}]")


def regex_grammar():
    atom = st.sampled_from(CHARS).map(re.escape) | st.sampled_from(CHARS[:10]) | st.sampled_from(ESCAPES) \
        | st.just(".") | char_class() | st.sampled_from(SPECIAL).map(lambda c: "\\" + c)
    return st.recursive(
        atom,
        lambda inner: st.lists(inner, min_size=1, max_size=4).map("".join)
        | st.lists(inner, min_size=2, max_size=3).map("|".join)
        | st.tuples(st.sampled_from(["(", "(?:"]), inner).map(lambda t: f"{t[0]}{t[1]})")
        | st.tuples(inner, quantifier()).map("".join)
        | st.tuples(st.sampled_from(["", "^"]), inner, st.sampled_from(["", "$", "$", "^", "$x"])).map("".join),
        max_leaves=8,
    )


REGEXES = regex_grammar() | st.text(alphabet=CHARS + SPECIAL + ["a", "d"], max_size=10)


def walk(dfa: automata.ByteDFA, rng: np.random.Generator, max_len: int = 24) -> bytes | None:
    """Bytes the DFA accepts (it only follows transitions, and stops in an accepting state), from
    a random walk that heads for acceptance once it is long."""
    dist = automata._levels_back(dfa.trans, dfa.accepting)  # fewest bytes to acceptance: only a guide
    s, out = 0, []
    while not (dfa.accepting[s] and (rng.random() < 0.3 or len(out) >= max_len)):
        moves = np.nonzero(dfa.trans[s] >= 0)[0]
        if len(out) >= max_len:  # only moves that get closer to acceptance
            moves = moves[dist[dfa.trans[s, moves]] < dist[s]]
        if not len(moves):
            return None
        b = int(rng.choice(moves))
        out.append(b)
        s = dfa.trans[s, b]
    return bytes(out)


def dfa_accepts(dfa: automata.ByteDFA, data: bytes) -> bool:
    s = 0
    for b in data:
        s = dfa.trans[s, b]
        if s < 0:
            return False
    return bool(dfa.accepting[s])


def compile_or_refuse(make):
    """-> the compiled thing, or None after checking the refusal is one ConstraintError line."""
    with time_bound(COMPILE_BOUND_S, "compiling a constraint"):
        try:
            return make()
        except ConstraintError as e:
            check_api_error(e)
            event("refused")
            return None


@given(pattern=REGEXES, data=st.data())
@fuzz_settings(default=200)
def test_a_regex_compiles_to_exactly_what_python_fullmatches_or_is_refused(pattern, data):
    dfa = compile_or_refuse(lambda: automata.regex_dfa(pattern))
    if dfa is None:
        return
    event("compiled")
    try:
        python = re.compile(pattern, re.ASCII)
    except re.error as e:
        raise AssertionError(f"jaxllm accepts {pattern!r}, which Python's re refuses ({e})") from None
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="walk seed"))
    texts = []
    for _ in range(20):
        accepted = walk(dfa, rng)
        if accepted is not None:
            try:
                texts.append(accepted.decode("utf-8"))
            except UnicodeDecodeError as e:
                bad = accepted[max(e.start - 4, 0) : e.end + 4]
                raise AssertionError(f"the DFA of {pattern!r} accepts bytes that are not UTF-8: ...{bad!r}...") from None
    try:
        texts += data.draw(st.lists(st.from_regex(python, fullmatch=True), max_size=5), label="Python's matches")
    except Exception:  # noqa: BLE001  (from_regex does not cover every pattern; the other texts still run)
        pass
    texts += data.draw(st.lists(st.text(alphabet=CHARS + list("aAzZ9é\x00"), max_size=8), max_size=20), label="texts")
    for text in texts:
        try:
            encoded = text.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate: no UTF-8 output can hold it
            continue
        assert dfa_accepts(dfa, encoded) == bool(python.fullmatch(text)), (pattern, text)


# ---------------------------------------------------------------------------- JSON Schemas

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-10, 10) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=5,
)
TYPES = ["string", "integer", "number", "boolean", "null", "object", "array"]
NAMES = st.text(alphabet='ab"\\é ', min_size=1, max_size=3)


def schema_strategy():
    """Schemas mostly of the enforced keywords, with others, wrong types and sizes mixed in."""
    leaf = st.fixed_dictionaries(
        {"type": st.sampled_from(TYPES[:5]) | st.lists(st.sampled_from(TYPES), min_size=1, max_size=3, unique=True)},
        optional={"minLength": counts(), "maxLength": counts(), "minimum": st.integers(-5, 5), "pattern": st.just("^a")},
    ) | st.fixed_dictionaries({"enum": st.lists(JSON, max_size=4) | st.lists(st.text(max_size=3), min_size=150, max_size=200)}) \
        | st.fixed_dictionaries({"const": JSON}) | st.sampled_from([{}, True, False])

    def nest(inner):
        props = st.dictionaries(NAMES, inner, max_size=3)
        obj = props.flatmap(lambda p: st.fixed_dictionaries(
            {"type": st.just("object"), "properties": st.just(p)},
            optional={"required": st.lists(st.sampled_from(sorted(p) or ["x"]), unique=True), "additionalProperties": st.booleans()}))
        arr = st.fixed_dictionaries({"type": st.just("array"), "items": inner},
                                    optional={"minItems": counts(), "maxItems": counts()})
        union = st.tuples(st.sampled_from(["anyOf", "oneOf"]), st.lists(inner, min_size=1, max_size=3)).map(lambda t: {t[0]: t[1]})
        return obj | arr | union

    nested = st.recursive(leaf, nest, max_leaves=6)
    schema = one_in(5, nested.map(lambda s: {"$defs": {"d": s}, "$ref": "#/$defs/d"}), nested)  # defs at the root
    # damage: one keyword given a random value, or an unknown / unsupported keyword added
    damaged = st.tuples(schema, st.sampled_from(["type", "properties", "required", "items", "enum", "anyOf", "minLength",
                                                 "maxItems", "$ref", "$defs", "$schema", "format", "x-extra"]), JSON) \
        .map(lambda t: {**t[0], t[1]: t[2]} if isinstance(t[0], dict) else t[0])
    return one_in(3, damaged | JSON, schema)


ENFORCED = {"type", "properties", "required", "items", "minItems", "maxItems", "minLength", "maxLength"}


def enforced(schema, defs=None, refs=()) -> bool:
    """Whether the README promises every output is valid: only the keywords it lists, each where it
    applies (a schema without a type or properties/items allows any value), enum/const/anyOf/$ref
    alone in their object; oneOf is outside the promise (it is compiled as anyOf)."""
    if defs is None:  # the root's: the only ones jaxllm resolves
        defs = schema.get("$defs") if isinstance(schema, dict) and isinstance(schema.get("$defs"), dict) else {}
    if schema is True or schema == {}:
        return True
    if not isinstance(schema, dict):
        return False
    keys = set(schema) - {"$defs"}
    for alone in ("enum", "const", "anyOf", "$ref"):
        if alone in keys:
            if keys != {alone}:
                return False
            if alone == "anyOf":
                return all(enforced(s, defs, refs) for s in schema["anyOf"])
            if alone == "$ref":  # a recursive one is refused
                ref = schema["$ref"]
                return ref not in refs and enforced(defs.get(ref.rsplit("/", 1)[-1]), defs, refs + (ref,))
            return True
    if not keys <= ENFORCED or not ({"type", "properties", "items"} & keys):
        return False
    return all(enforced(s, defs, refs) for s in [*schema.get("properties", {}).values(), *([schema["items"]] if "items" in schema else [])])


@given(schema=schema_strategy(), data=st.data())
@fuzz_settings(default=150)
def test_a_json_schema_compiles_to_valid_documents_or_is_refused(schema, data):
    dfa = compile_or_refuse(lambda: automata.regex_dfa(automata.schema_regex(C.JsonSchema(schema).schema)))
    if dfa is None:
        return
    jsonschema.validators.validator_for(schema).check_schema(schema)  # jaxllm compiled it, so it must be a schema
    exact = enforced(schema)
    event(f"compiled ({'enforced' if exact else 'partly checked after generation'})")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="walk seed"))
    for _ in range(10):
        accepted = walk(dfa, rng, max_len=40)
        if accepted is None:
            continue
        text = accepted.decode("utf-8")  # strict: a DFA over bytes must only accept UTF-8
        value = json.loads(text)
        if exact:
            jsonschema.validate(value, schema)


# ---------------------------------------------------------------------------- generation


@pytest.fixture(scope="module")
def constraint_cache():
    """A constraint cache of this module's own, so a leftover temporary file is this module's."""
    with tempfile.TemporaryDirectory() as folder:
        previous = os.environ.get("JAXLLM_CONSTRAINT_CACHE")
        os.environ["JAXLLM_CONSTRAINT_CACHE"] = folder
        yield folder
        if previous is None:
            del os.environ["JAXLLM_CONSTRAINT_CACHE"]
        else:
            os.environ["JAXLLM_CONSTRAINT_CACHE"] = previous


@given(data=st.data())
@fuzz_settings(default=12)
def test_a_constrained_generation_ends_valid_or_with_reason_constraint(params, cfg, tokenizer, constraint_cache, data):
    kind = data.draw(st.sampled_from(["regex", "schema", "choice"]), label="kind")
    if kind == "regex":
        pattern = data.draw(REGEXES, label="pattern")
        constraint, exact = C.Regex(pattern), True
    elif kind == "schema":
        schema = data.draw(schema_strategy(), label="schema")
        constraint, exact = compile_or_refuse(lambda: C.JsonSchema(schema)), None
    else:
        choices = data.draw(one_in(6, st.lists(st.text(max_size=4), max_size=3), st.lists(st.text(min_size=1, max_size=4), min_size=1, max_size=3)), label="choices")
        constraint, exact = compile_or_refuse(lambda: C.Choice(choices)), True
    if constraint is None:
        return
    max_new_tokens = data.draw(st.sampled_from([4, 12]), label="max_new_tokens")
    with time_bound(GENERATE_BOUND_S, "a constrained generation"):
        try:
            result = generate(params, cfg, ["x"], tokenizer=tokenizer, constraint=constraint, max_new_tokens=max_new_tokens,
                              temperature=1.0, seed=data.draw(st.integers(0, 2**31), label="seed"))
        except ConstraintError as e:
            check_api_error(e)
            event(f"{kind}: refused")
            return
    reason = result.finish_reasons[0]
    event(f"{kind}: {reason}")
    assert reason in FINISH_REASONS[1:] and len(result.token_ids[0]) <= max_new_tokens
    if exact is None:
        exact = enforced(schema)
    if reason != "constraint" and exact:
        assert result.valid[0], (constraint, result.texts[0], result.errors[0])
    assert not partial_files(constraint_cache)
