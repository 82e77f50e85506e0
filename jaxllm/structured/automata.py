"""Byte-level automata for structured output, built on the host with numpy.

Legend: N automaton states, V vocab, L longest token in bytes.

Everything here is about bytes, because tokens are byte strings: a regex becomes a DFA
over UTF-8 bytes (`regexp.py`), a list of choices a trie, and JSON a byte automaton whose
stack moves (brackets and commas) are left to the decode loop. `token_table` then runs every token's bytes through
a DFA from every state, giving the table the decode loop gathers from:

    next[s, t] = the state after token t's bytes from state s, or -1 where t is not allowed.
"""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np

from jaxllm.errors import ConstraintError
from jaxllm.structured import regexp

DEAD = -1  # no transition
STACK = -2  # in `token_table` with `stack_bytes`: the decode loop's JSON stack decides


@dataclasses.dataclass(frozen=True)
class ByteDFA:
    trans: np.ndarray  # [N, 256] int32 next state, DEAD where the byte is not allowed; start = 0
    accepting: np.ndarray  # [N] bool


# ---------------------------------------------------------------------------- regex and choices


def regex_dfa(pattern: str) -> ByteDFA:
    """A minimal DFA over UTF-8 bytes accepting exactly the strings `pattern` fully matches
    (`regexp` has the supported syntax); dead ends are removed."""
    trans, accepting = regexp.compile_regex(pattern)
    return trim(ByteDFA(trans, accepting))


def choices_dfa(choices) -> ByteDFA:
    """A trie over the choices' UTF-8 bytes: accepts exactly one of the strings."""
    choices = list(choices)
    if not choices or any(not isinstance(c, str) or not c for c in choices):
        raise ConstraintError("choices must be a non-empty list of non-empty strings")
    trans, accepting = [np.full(256, DEAD, np.int32)], [False]
    for c in choices:
        s = 0
        for b in c.encode("utf-8"):
            if trans[s][b] == DEAD:
                trans[s][b] = len(trans)
                trans.append(np.full(256, DEAD, np.int32))
                accepting.append(False)
            s = trans[s][b]
        accepting[s] = True
    return ByteDFA(np.stack(trans), np.array(accepting, bool))


def trim(dfa: ByteDFA) -> ByteDFA:
    """Removes transitions into states from which no accepting state can be reached.

    Otherwise a row could walk into a dead end, where it could neither go on nor stop.
    """
    live = _levels_back(dfa.trans, dfa.accepting) >= 0
    if not live[0]:
        raise ConstraintError("the constraint cannot be satisfied by any string")
    trans = np.where((dfa.trans >= 0) & live[np.maximum(dfa.trans, 0)], dfa.trans, DEAD)
    return minimize(ByteDFA(trans.astype(np.int32), dfa.accepting))


def _levels_back(trans: np.ndarray, goal: np.ndarray) -> np.ndarray:
    """[N] int64: the fewest bytes from each state to a `goal` state (-1: none), by a
    breadth-first search along the edges backwards, O(edges)."""
    src, byte = np.nonzero(trans >= 0)
    dst = trans[src, byte]
    order = np.argsort(dst, kind="stable")  # the edges into each state, contiguous
    preds, first = src[order], np.searchsorted(dst[order], np.arange(trans.shape[0] + 1))
    level = np.where(goal, 0, -1)
    frontier, depth = np.nonzero(goal)[0], 0
    while len(frontier):
        _, k = _runs(first[frontier], first[frontier + 1] - first[frontier])
        frontier, depth = np.unique(preds[k][level[preds[k]] < 0]), depth + 1
        level[frontier] = depth
    return level


def minimize(dfa: ByteDFA) -> ByteDFA:
    """Merges states with the same future (Moore's partition refinement); the start stays state 0.

    `dfa` is trimmed (every transition leads to a state that can still accept). Each round
    splits classes by (class, classes of the successors), grouped by a random 64-bit hash of
    that row; the result is checked exactly and, on a (vanishingly unlikely) hash collision,
    recomputed with exact row comparisons.
    """
    for exact in (False, True):
        cls = _refine(dfa, exact)
        targets = np.where(dfa.trans >= 0, cls[np.maximum(dfa.trans, 0)], -1)
        rep = np.zeros(cls.max() + 1, np.int64)
        rep[cls[::-1]] = np.arange(len(cls))[::-1]  # one representative per class
        if exact or np.array_equal(targets, targets[rep[cls]]):
            break
    trans = np.where(dfa.trans[rep] >= 0, cls[np.maximum(dfa.trans[rep], 0)], DEAD)
    return ByteDFA(trans.astype(np.int32), dfa.accepting[rep])


def _refine(dfa: ByteDFA, exact: bool) -> np.ndarray:
    """Class of each state after refinement, numbered by first appearance (state 0 -> class 0)."""
    # Start from what equal futures share: acceptance, and the shortest way to an accepting
    # state and to one with no moves (which accepts only the empty string). A chain such as
    # a{N} or .{0,N} is then split at once, not in N rounds of O(N) work.
    terminal = ~np.any(dfa.trans >= 0, axis=1)
    keys = np.stack([dfa.accepting, _levels_back(dfa.trans, dfa.accepting), _levels_back(dfa.trans, terminal)], axis=1)
    cls = np.unique(keys, axis=0, return_inverse=True)[1].reshape(-1).astype(np.int64)
    # bytes every state treats alike split nothing: one column per distinct column (a few dozen, not 256)
    trans = np.unique(dfa.trans, axis=1)
    weights = np.random.default_rng(0).integers(1, 2**62, size=trans.shape[1] + 1, dtype=np.int64)
    count = len(np.unique(cls))
    while True:
        targets = np.where(trans >= 0, cls[np.maximum(trans, 0)], -1)
        if exact:
            _, new = np.unique(np.concatenate([cls[:, None], targets], axis=1), axis=0, return_inverse=True)
        else:
            _, new = np.unique(cls * weights[0] + (targets + 1) @ weights[1:], return_inverse=True)
        new = new.reshape(-1)
        stable = new.max() + 1 == count
        cls, count = new, new.max() + 1
        if stable:
            break
    firsts = np.unique(cls, return_index=True)[1]
    rank = np.empty(len(firsts), np.int64)
    rank[np.argsort(firsts)] = np.arange(len(firsts))
    return rank[cls]


FAR = 1 << 20  # distance of a state that cannot reach its goal


def token_distances(table: np.ndarray, goal: np.ndarray) -> np.ndarray:
    """[N] int32: the fewest tokens from each state to a `goal` state (FAR if none), moving by
    the token table [N, C] (negative entries are not moves).

    The decode loop allows a token only if this many tokens still fit after it, so every row
    stays finishable within max_new_tokens without giving up on paths that need long tokens.
    """
    dist = np.where(goal, 0, FAR).astype(np.int64)
    moves = table >= 0
    target = np.maximum(table, 0)
    while True:
        best = np.minimum(dist, np.where(moves, dist[target], FAR).min(axis=1, initial=FAR) + 1)
        if np.array_equal(best, dist):
            return np.minimum(dist, FAR).astype(np.int32)
        dist = best


# ---------------------------------------------------------------------------- JSON with a stack

# What a JSON byte transition does to the stack (the low 3 bits of `JsonAutomaton.code`).
NORMAL, PUSH_OBJECT, PUSH_ARRAY, POP_OBJECT, POP_ARRAY, COMMA = range(6)
STACK_BYTES = b"{}[],"  # the only bytes whose transitions involve the stack
WHITESPACE = b" \n\r\t"


@dataclasses.dataclass(frozen=True)
class JsonAutomaton:
    """JSON's byte automaton without its stack: what each byte does in each local state.

    code[s, b] = target * 8 + action (DEAD = not allowed). NORMAL and PUSH moves go to
    `target`; a pop goes to `after_value` (or `done` when the outermost bracket closes);
    a comma goes to `object_key` or `value` depending on the innermost open bracket. The
    decode loop keeps the stack (one bit per level) and applies these rules.
    """

    code: np.ndarray  # [N, 256] int32
    accepting: np.ndarray  # [N] bool: only `done`
    after_value: int
    done: int
    object_key: int
    value: int

    def normal_dfa(self) -> ByteDFA:
        """The same automaton with every stack move removed (for tokens without stack bytes)."""
        trans = np.where((self.code >= 0) & (self.code % 8 == NORMAL), self.code // 8, DEAD)
        return ByteDFA(trans.astype(np.int32), self.accepting)

    def close_cost(self, table: np.ndarray) -> np.ndarray:
        """[N]: fewest tokens from each state to one where the innermost bracket can close,
        moving with the tokens of `table` [N, C] that do not touch the stack.

        The tokens to finish a document from (state, depth d) are at most close_cost + d (one
        bracket token per level); `done` costs 0.
        """
        action = np.where(self.code >= 0, self.code % 8, -1)
        cost = token_distances(table, ((action == POP_OBJECT) | (action == POP_ARRAY)).any(axis=1))
        cost[self.done] = 0
        opens = ((action == PUSH_OBJECT) | (action == PUSH_ARRAY)).any(axis=1)
        cost[opens & (cost >= FAR)] = 2  # before the document (only a bracket can follow): "{}"
        return cost


def json_automaton(max_whitespace: int = 8, allow_array: bool = False) -> JsonAutomaton:
    """The local automaton of JSON text whose outermost value is an object (or an array).

    At most `max_whitespace` whitespace bytes are allowed in a row between JSON tokens (and
    none after the end), so a model cannot spend its budget on spaces. Strings allow any
    byte from 0x20 up except an unescaped quote or backslash; escapes are JSON's.
    """
    ws_states = ["start", "value", "array_first", "object_first", "object_key", "colon", "after"]
    names = [(s, k) for s in ws_states for k in range(max_whitespace + 1)]
    names += [(s, 0) for s in (
        "key", "key_esc", "key_u1", "key_u2", "key_u3", "key_u4",
        "str", "str_esc", "str_u1", "str_u2", "str_u3", "str_u4",
        "t1", "t2", "t3", "f1", "f2", "f3", "f4", "n1", "n2", "n3",
        "minus", "zero", "int", "dot", "frac", "exp", "exp_sign", "exp_int", "done",
    )]
    ids = {n: i for i, n in enumerate(names)}
    code = np.full((len(names), 256), DEAD, np.int32)

    def on(state: str, chars, target: str, action: int = NORMAL) -> None:
        for k in range(max_whitespace + 1 if state in ws_states else 1):
            for b in (chars.encode() if isinstance(chars, str) else chars):
                code[ids[state, k], b] = ids[target, 0] * 8 + action

    digits, hex_digits = "0123456789", "0123456789abcdefABCDEF"
    for s in ws_states:
        for k in range(max_whitespace):
            for b in WHITESPACE:
                code[ids[s, k], b] = ids[s, k + 1] * 8
    on("start", "{", "object_first", PUSH_OBJECT)
    if allow_array:
        on("start", "[", "array_first", PUSH_ARRAY)
    for s in ("value", "array_first"):
        on(s, '"', "str")
        on(s, "t", "t1"), on(s, "f", "f1"), on(s, "n", "n1")
        on(s, "-", "minus"), on(s, "0", "zero"), on(s, "123456789", "int")
        on(s, "{", "object_first", PUSH_OBJECT), on(s, "[", "array_first", PUSH_ARRAY)
    on("array_first", "]", "after", POP_ARRAY)
    on("object_first", '"', "key"), on("object_first", "}", "after", POP_OBJECT)
    on("object_key", '"', "key")
    for prefix, closed in (("key", "colon"), ("str", "after")):
        on(prefix, bytes(b for b in range(0x20, 256) if b not in b'"\\'), prefix)
        on(prefix, '"', closed)
        on(prefix, "\\", f"{prefix}_esc")
        on(f"{prefix}_esc", '"\\/bfnrt', prefix)
        on(f"{prefix}_esc", "u", f"{prefix}_u1")
        for i in (1, 2, 3):
            on(f"{prefix}_u{i}", hex_digits, f"{prefix}_u{i + 1}")
        on(f"{prefix}_u4", hex_digits, prefix)
    on("colon", ":", "value")
    for word in ("true", "false", "null"):
        states = [f"{word[0]}{i}" for i in range(1, len(word))] + ["after"]
        for state, char, nxt in zip(states, word[1:], states[1:]):
            on(state, char, nxt)
    on("minus", "0", "zero"), on("minus", "123456789", "int")
    on("int", digits, "int"), on("dot", digits, "frac"), on("frac", digits, "frac")
    on("exp", "+-", "exp_sign"), on("exp", digits, "exp_int"), on("exp_sign", digits, "exp_int")
    on("exp_int", digits, "exp_int")
    for s in ("zero", "int"):
        on(s, ".", "dot")
    for s in ("zero", "int", "frac"):
        on(s, "eE", "exp")
    for s in ("after", "zero", "int", "frac", "exp_int"):  # what may follow a complete value
        on(s, ",", "after", COMMA), on(s, "}", "after", POP_OBJECT), on(s, "]", "after", POP_ARRAY)
        if s != "after" and max_whitespace:  # whitespace ends a number
            for b in WHITESPACE:
                code[ids[s, 0], b] = ids["after", 1] * 8
    accepting = np.zeros(len(names), bool)
    accepting[ids["done", 0]] = True
    return JsonAutomaton(
        code=code, accepting=accepting, after_value=ids["after", 0], done=ids["done", 0],
        object_key=ids["object_key", 0], value=ids["value", 0],
    )


# ---------------------------------------------------------------------------- JSON Schema -> regex

_WS = "[ ]?"  # schema output: compact JSON, an optional single space after ':' and ','
_STRING_CHAR = r'([^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})'
_INTEGER = r"-?(0|[1-9][0-9]*)"
_NUMBER = _INTEGER + r"(\.[0-9]+)?([eE][+-]?[0-9]+)?"


def _literal(value) -> str:
    """A regex matching exactly the compact JSON of `value`."""
    return re.escape(json.dumps(value, ensure_ascii=False, separators=(",", ":")))


def schema_regex(schema: dict, depth: int = 2) -> str:
    """A regex whose matches are (compact) JSON documents valid under `schema`.

    Supported: type (and lists of types), properties with required (in the schema's order),
    enum, const, anyOf/oneOf, $ref into $defs/definitions (not recursive), arrays with
    items, minItems/maxItems, strings with minLength/maxLength, integer, number, boolean,
    null. A sub-schema without a type allows any JSON value nested at most `depth` deep.
    Bounds the regex cannot express (minimum, pattern, ...) are checked after generation.
    """
    if not isinstance(schema, dict):
        raise ConstraintError("a JSON Schema must be a JSON object")
    _check_schema(schema)
    defs = {**schema.get("definitions", {}), **schema.get("$defs", {})}
    return _schema(schema, defs, depth, ())


def _check_schema(schema: dict) -> None:
    """Refuses a schema its meta-schema refuses (a keyword of the wrong type, ...) before it
    is compiled, with jsonschema's reason: `verify` would otherwise fail after generation."""
    import jsonschema

    if not isinstance(schema.get("$schema", ""), str):
        raise ConstraintError(f"invalid JSON Schema: $schema must be a URI string, got {schema['$schema']!r}")
    try:
        jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator).check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/".join(map(str, e.absolute_path))
        raise ConstraintError(f"invalid JSON Schema{f' at {where}' if where else ''}: {e.message}") from None


def _schema(s, defs, depth: int, refs: tuple) -> str:
    if s is True or s == {}:
        return _any_value(depth)
    if not isinstance(s, dict):
        raise ConstraintError(f"unsupported schema {s!r}")
    if "$ref" in s:
        ref = s["$ref"]
        name = ref.rsplit("/", 1)[-1]
        if name not in defs or not ref.startswith(("#/$defs/", "#/definitions/")):
            raise ConstraintError(f"cannot resolve $ref {ref!r} (only local #/$defs/ references)")
        if ref in refs:
            raise ConstraintError(f"recursive schemas are not supported ($ref {ref!r})")
        return _schema(defs[name], defs, depth, refs + (ref,))
    if "const" in s:
        return _literal(s["const"])
    if "enum" in s:
        if not s["enum"]:
            raise ConstraintError("an empty enum allows no value")
        return "(" + "|".join(_literal(v) for v in s["enum"]) + ")"
    for key in ("anyOf", "oneOf"):
        if key in s:
            return "(" + "|".join(_schema(sub, defs, depth, refs) for sub in s[key]) + ")"
    kind = s.get("type")
    if isinstance(kind, list):
        return "(" + "|".join(_schema({**s, "type": k}, defs, depth, refs) for k in kind) + ")"
    if kind is None:
        kind = "object" if "properties" in s else "array" if "items" in s else None
    if kind == "string":
        lo, hi = int(s.get("minLength", 0)), s.get("maxLength")
        if hi is not None and hi < lo:
            raise ConstraintError(f"minLength {lo} > maxLength {hi}: no string fits")
        return f'"{_STRING_CHAR}{{{lo},{"" if hi is None else int(hi)}}}"'
    if kind == "integer":
        return _INTEGER
    if kind == "number":
        return _NUMBER
    if kind == "boolean":
        return "(true|false)"
    if kind == "null":
        return "null"
    if kind == "array":
        item = _schema(s.get("items", {}), defs, max(depth - 1, 0), refs)
        lo, hi = int(s.get("minItems", 0)), s.get("maxItems")
        if hi is not None and hi < lo:
            raise ConstraintError(f"minItems {lo} > maxItems {hi}: no array fits")
        return r"\[" + _WS + _repeat(item, lo, None if hi is None else int(hi)) + _WS + r"\]"
    if kind == "object":
        props = s.get("properties")
        if props is None:
            return _any_object(depth)
        required = set(s.get("required", ()))
        unknown = required - set(props)
        if unknown:
            raise ConstraintError(f"required properties {sorted(unknown)} are not in properties")
        members = [(_literal(k) + _WS + ":" + _WS + _schema(v, defs, max(depth - 1, 0), refs), k in required)
                   for k, v in props.items()]
        return r"\{" + _WS + _members(members) + _WS + r"\}"
    if kind is None:
        return _any_value(depth)
    raise ConstraintError(f"unsupported schema type {kind!r}")


def _repeat(item: str, lo: int, hi: int | None) -> str:
    """`item` lo..hi times separated by commas."""
    sep = "," + _WS
    if hi == 0:
        return ""
    rest_lo, rest_hi = max(lo - 1, 0), "" if hi is None else hi - 1
    body = f"{item}({sep}{item}){{{rest_lo},{rest_hi}}}"
    return body if lo > 0 else f"({body})?"


def _members(members: list[tuple[str, bool]]) -> str:
    """Object members in order, the optional ones may be left out, commas only between."""
    sep = "," + _WS
    after_first = ""  # members i.. once one has been written: each one is ",m" (optional ones may go)
    first = ""  # members i.. when none has been written yet
    for text, required in reversed(members):
        with_comma = f"{sep}{text}"
        first = f"{text}{after_first}" if required else f"({text}{after_first}|{first})"
        after_first = f"{with_comma}{after_first}" if required else f"({with_comma})?{after_first}"
    return first


def _any_value(depth: int) -> str:
    scalars = f'"{_STRING_CHAR}*"|{_NUMBER}|true|false|null'
    if depth <= 0:
        return f"({scalars})"
    inner = _any_value(depth - 1)
    array = r"\[" + _WS + _repeat(inner, 0, None) + _WS + r"\]"
    return f"({scalars}|{_any_object(depth)}|{array})"


def _any_object(depth: int) -> str:
    member = f'"{_STRING_CHAR}*"{_WS}:{_WS}{_any_value(depth - 1)}'
    return r"\{" + _WS + _repeat(member, 0, None) + _WS + r"\}"


# ---------------------------------------------------------------------------- tokens


def token_table(
    trans: np.ndarray, token_bytes: np.ndarray, lengths: np.ndarray, *, skip: np.ndarray | None = None,
    states: np.ndarray | None = None,
) -> np.ndarray:
    """next [N, V] int32: the state after each token's bytes from each state, DEAD if any byte fails.

    trans: [N, 256] byte DFA; token_bytes [V, L], lengths [V]. Tokens without bytes and
    tokens in `skip` (bool [V]) are DEAD. With `states` [M], only rows for those start states
    ([M, V]). The vocabulary is walked as a trie, one byte level at a time, with the live
    (state, prefix) pairs: a prefix shared by many tokens is followed once per state, and a
    pair whose byte is not allowed is dropped with everything below it.
    """
    states = np.arange(trans.shape[0]) if states is None else np.asarray(states)
    out = np.full((len(states), token_bytes.shape[0]), DEAD, np.int32)
    usable = lengths > 0
    if skip is not None:
        usable &= ~skip
    toks = np.nonzero(usable)[0]
    node = np.zeros(len(toks), np.int64)  # each token's prefix node at the previous level (the root: 0)
    row, at, cur = np.arange(len(states)), np.zeros(len(states), np.int64), states.astype(np.int64)  # live pairs
    previous = 1
    for j in range(token_bytes.shape[1]):
        live = lengths[toks] > j
        toks, node = toks[live], node[live]
        if not len(toks) or not len(row):
            break
        # this level's trie nodes, sorted by (parent, byte): a parent's children are contiguous
        nodes, child = np.unique(node * 256 + token_bytes[toks, j], return_inverse=True)
        child = child.reshape(-1)
        first_child = np.searchsorted(nodes // 256, np.arange(previous + 1))
        src, at = _runs(first_child[at], first_child[at + 1] - first_child[at])
        cur = trans[cur[src], nodes[at] % 256]
        alive = cur >= 0
        row, at, cur = row[src][alive], at[alive], cur[alive]
        # the tokens that end at this level take their node's state
        ending = lengths[toks] == j + 1
        order = np.argsort(child[ending], kind="stable")
        end_tok, end_node = toks[ending][order], child[ending][order]
        first_end = np.searchsorted(end_node, np.arange(len(nodes) + 1))
        src, k = _runs(first_end[at], first_end[at + 1] - first_end[at])
        out[row[src], end_tok[k]] = cur[src]
        node, previous = child, len(nodes)
    return out


def _runs(starts: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Expands item i into counts[i] outputs -> (i for each output, starts[i] + 0..counts[i]-1)."""
    src = np.repeat(np.arange(len(counts)), counts)
    return src, starts[src] + np.arange(len(src)) - np.repeat(np.cumsum(counts) - counts, counts)
