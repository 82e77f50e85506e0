"""Structured output: regex, JSON, JSON Schema and choices, enforced inside the compiled decode loop.

Legend: B batch, V vocab, N automaton states, C token classes, P tokens with JSON stack
bytes, L their longest length in bytes.

A constraint is compiled on the host, once per (constraint, tokenizer), into a token table:

    next[s, t] = the state after emitting token t in state s; -1 = t is not allowed here.

Tokens that behave the same in every state share a column (`token_class`), which keeps the
table small for large vocabularies. EOS is allowed exactly in accepting states. The decode
loop carries each row's state, masks the logits first in the chain (docs/GENERATION.md), and
after the token is chosen looks up the next state: no host round trip per token.

JSON nests, so its automaton alone is not enough: rows in JSON mode also carry a stack
(one bit per open bracket: object or array, up to `max_depth`) and the tokens containing
a bracket or comma are run byte by byte against it on the device (`_run_stack`),
vectorized over those tokens. Every other token's effect does not depend on the stack and
comes from the table.

State 0 is "free": every token allowed, for unconstrained rows in a constrained batch.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
import warnings
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import cachedirs
from jaxllm.errors import CacheError, ConstraintError
from jaxllm.sampling import eos_mask, pow2_bucket
from jaxllm.structured import automata
from jaxllm.structured.automata import DEAD, STACK

FORMAT_VERSION = 1  # of the cached .npz files (changes to the code that builds them are detected)

# ---------------------------------------------------------------------------- what users write


@dataclasses.dataclass(frozen=True)
class Regex:
    """The output must fully match `pattern`: a practical subset of Python's syntax (see `regexp`;
    `\\w`, `\\d`, `\\s` are ASCII classes, as with `re.ASCII`)."""

    pattern: str


@dataclasses.dataclass(frozen=True)
class Choice:
    """The output is exactly one of `options`."""

    options: tuple[str, ...]

    def __init__(self, options: Sequence[str]):
        object.__setattr__(self, "options", tuple(options))


@dataclasses.dataclass(frozen=True)
class Json:
    """Any JSON object (or array, with `allow_array`), nested at most `max_depth` deep, with at
    most `max_whitespace` whitespace bytes in a row between tokens."""

    max_depth: int = 16
    max_whitespace: int = 8
    allow_array: bool = False

    def __post_init__(self):
        if not 1 <= self.max_depth <= 30:
            raise ConstraintError(f"max_depth must be in [1, 30], got {self.max_depth}")
        if not 0 <= self.max_whitespace <= 64:
            raise ConstraintError(f"max_whitespace must be in [0, 64], got {self.max_whitespace}")


@dataclasses.dataclass(frozen=True)
class JsonSchema:
    """A JSON document valid under `schema` (see `automata.schema_regex` for what is enforced
    while decoding; the rest is checked by `verify`)."""

    text: str  # the schema as canonical JSON, so the constraint is hashable

    def __init__(self, schema: dict | str):
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise ConstraintError(f"the JSON Schema is not valid JSON: {e}") from None
        object.__setattr__(self, "text", json.dumps(schema))  # key order kept: it is the output order

    @property
    def schema(self) -> dict:
        return json.loads(self.text)


Constraint = Regex | Choice | Json | JsonSchema


def verify(constraint: Constraint, text: str) -> str | None:
    """None if `text` satisfies the constraint, else a one-line reason."""
    if isinstance(constraint, Regex):
        return None if re.fullmatch(constraint.pattern, text, flags=re.ASCII) else "does not match the regex"
    if isinstance(constraint, Choice):
        return None if text in constraint.options else "is not one of the choices"
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        return f"invalid JSON: {e}"
    if isinstance(constraint, Json):
        kinds = (dict, list) if constraint.allow_array else (dict,)
        return None if isinstance(value, kinds) else "the JSON value is not an object"
    import jsonschema

    try:
        jsonschema.validate(value, constraint.schema)
    except jsonschema.ValidationError as e:
        return f"schema: {e.message}"
    except jsonschema.SchemaError as e:
        raise ConstraintError(f"invalid JSON Schema: {e.message}") from None
    return None


def verify_all(specs: Sequence[Constraint | None], texts: Sequence[str]) -> tuple[list | None, list | None]:
    """-> (valid, errors) per text: True/False and the reason, None for unconstrained rows;
    (None, None) when no row has a constraint."""
    if all(c is None for c in specs):
        return None, None
    errors = [None if c is None else verify(c, t) for c, t in zip(specs, texts)]
    return [None if c is None else e is None for c, e in zip(specs, errors)], errors


# ---------------------------------------------------------------------------- host: token tables


@dataclasses.dataclass(frozen=True)
class TokenTable:
    """One constraint over one vocabulary (numpy, host)."""

    next: np.ndarray  # [N, C] int32 next state per token class; DEAD; STACK (JSON: the stack decides)
    token_class: np.ndarray  # [V] int32
    accepting: np.ndarray  # [N] bool
    initial: int
    cost: np.ndarray  # [N] int32 fewest tokens still needed to finish (JSON: plus one per open bracket)

    def full(self) -> np.ndarray:
        """next [N, V] (expanded from classes)."""
        return self.next[:, self.token_class]


def compress(full: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """next [N, V] -> (next [N, C], token_class [V]): identical columns share a class."""
    weights = np.random.default_rng(0).random(full.shape[0])
    hashes = full.T.astype(np.float64) @ weights  # a BLAS product; the exact check below guards merges
    _, first, token_class = np.unique(hashes, return_index=True, return_inverse=True)
    table = full[:, first]
    if not np.array_equal(table[:, token_class.reshape(-1)], full):  # a hash collision: do not merge
        return full, np.arange(full.shape[1], dtype=np.int32)
    return np.ascontiguousarray(table), token_class.reshape(-1).astype(np.int32)


def dfa_table(dfa: automata.ByteDFA, tokenizer) -> TokenTable:
    """Token table of a byte DFA. Tokenizers that drop the first output space (SentencePiece's
    dummy prefix) get a separate start state where a token's leading space is not matched."""
    token_bytes, lengths = tokenizer.token_bytes()
    full = automata.token_table(dfa.trans, token_bytes, lengths)
    accepting, initial = dfa.accepting, 0
    if tokenizer.strips_dummy_prefix:  # a fresh start state for the first token
        spaced = (lengths > 0) & (token_bytes[:, 0] == ord(" "))
        stripped = np.where(spaced[:, None], np.roll(token_bytes, -1, axis=1), token_bytes)
        first = automata.token_table(dfa.trans, stripped, lengths - spaced, states=np.array([0]))[0]
        first = np.where(spaced & (lengths == 1), 0, first)  # a lone space: text still empty
        full = np.concatenate([full, np.where(spaced, first, full[0])[None]])
        accepting, initial = np.append(accepting, accepting[0]), full.shape[0] - 1
    table, token_class = compress(full)
    return TokenTable(table, token_class, accepting, initial, automata.token_distances(table, accepting))


def json_table(spec: Json, tokenizer) -> TokenTable:
    """Token table of JSON mode: tokens with stack bytes are STACK in every state."""
    auto = automata.json_automaton(spec.max_whitespace, spec.allow_array)
    token_bytes, lengths = tokenizer.token_bytes()
    on_stack = _stack_tokens(token_bytes, lengths)
    full = automata.token_table(auto.normal_dfa().trans, token_bytes, lengths, skip=on_stack)
    full[:, on_stack] = STACK
    table, token_class = compress(full)
    return TokenTable(table, token_class, auto.accepting, 0, auto.close_cost(table))


def _stack_tokens(token_bytes: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """bool [V]: tokens with a byte whose JSON transition may touch the stack."""
    inside = np.arange(token_bytes.shape[1])[None] < lengths[:, None]
    return np.any(np.isin(token_bytes, np.frombuffer(automata.STACK_BYTES, np.uint8)) & inside, axis=1)


@functools.lru_cache(maxsize=1)
def _code_version() -> str:
    """A hash of the code that builds tables: a changed builder never reads an old table."""
    files = [automata.__file__, automata.regexp.__file__, __file__]
    sources = [Path(f).read_bytes() for f in files] + [str(FORMAT_VERSION).encode()]
    return hashlib.sha256(b"".join(sources)).hexdigest()[:16]


def _cache_dir() -> Path | None:
    """The table cache's directory, or None: turned off, or not this user's alone (then a warning
    says so once and tables are built without it: a planted table would decide what is valid)."""
    path = os.environ.get("JAXLLM_CONSTRAINT_CACHE", str(Path.home() / ".cache" / "jaxllm" / "constraints"))
    if path in ("", "off", "0"):
        return None
    try:
        return cachedirs.private_dir(path, "JAXLLM_CONSTRAINT_CACHE")
    except CacheError as e:
        warnings.warn(f"{e}; building constraint tables without it", stacklevel=3)
        return None


def compile_table(constraint: Constraint, tokenizer) -> TokenTable:
    """The constraint's token table, from the on-disk cache when it was built before.

    Cached as .npz (no pickle) keyed by the constraint, the tokenizer's fingerprint and the
    table-building code; `JAXLLM_CONSTRAINT_CACHE=DIR` moves the cache, `=off` turns it off.
    """
    key = hashlib.sha256(repr((_code_version(), constraint, tokenizer.fingerprint)).encode()).hexdigest()[:32]
    folder = _cache_dir()
    path = folder / f"{key}.npz" if folder else None
    if path is not None and path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                return TokenTable(z["next"], z["token_class"], z["accepting"], int(z["initial"]), z["cost"])
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache file is rebuilt
    if isinstance(constraint, Json):
        table = json_table(constraint, tokenizer)
    else:
        table = dfa_table(_dfa(constraint), tokenizer)
    if path is not None:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
            np.savez(tmp, next=table.next, token_class=table.token_class, accepting=table.accepting,
                     initial=np.int64(table.initial), cost=table.cost)
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only cache folder only costs time
    return table


def _dfa(constraint: Constraint) -> automata.ByteDFA:
    if isinstance(constraint, Regex):
        return automata.regex_dfa(constraint.pattern)
    if isinstance(constraint, Choice):
        return automata.choices_dfa(constraint.options)
    if isinstance(constraint, JsonSchema):
        return automata.regex_dfa(automata.schema_regex(constraint.schema))
    raise ConstraintError(f"not a constraint: {constraint!r}")


# ---------------------------------------------------------------------------- device: the batch's automaton


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=[
        "next", "token_class", "accepting", "cost", "json_code", "stack_ids", "stack_bytes", "stack_len", "stack_slot",
    ],
    meta_fields=["json_offset", "after_value", "done", "object_key", "value", "max_depth"],
)
@dataclasses.dataclass(frozen=True)
class Automaton:
    """Every constraint of one batch in one table; each row starts in its own initial state."""

    next: jax.Array  # [N, C] int32 (global state ids; DEAD; STACK)
    token_class: jax.Array  # [V] int32
    accepting: jax.Array  # [N] bool
    cost: jax.Array  # [N] int32 fewest tokens still needed to finish from each state (JSON: + depth)
    # JSON mode (P = 0 when no row uses it): local byte automaton and the stack tokens
    json_code: jax.Array  # [Nj, 256] int32 target * 8 + action, local ids
    stack_ids: jax.Array  # [P] int32 tokens containing stack bytes
    stack_bytes: jax.Array  # [P, L] uint8
    stack_len: jax.Array  # [P] int32
    stack_slot: jax.Array  # [V] int32 index into stack_ids, -1 for other tokens
    json_offset: int = 0  # global id of JSON's local state 0
    after_value: int = 0
    done: int = 0
    object_key: int = 0
    value: int = 0
    max_depth: int = 0

    @property
    def uses_stack(self) -> bool:
        return self.stack_ids.shape[0] > 0


@functools.partial(jax.tree_util.register_dataclass, data_fields=["state", "stack", "depth"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class RowState:
    state: jax.Array  # [B] int32 automaton state
    stack: jax.Array  # [B] int32 JSON stack, bit i = 1 when the bracket at depth i + 1 is an array
    depth: jax.Array  # [B] int32 open brackets


def build(constraints: Sequence[Constraint | None], tokenizer, vocab_size: int) -> tuple[Automaton, RowState]:
    """One automaton for a batch (row r follows constraints[r]; None = unconstrained) and the
    rows' initial states. Table shapes are rounded up to powers of two, so a new constraint
    rarely compiles a new decode program."""
    if tokenizer is None:
        raise ConstraintError("constraints need a tokenizer (to know each token's bytes)")
    if tokenizer.vocab_size > vocab_size:
        raise ConstraintError(f"the tokenizer has {tokenizer.vocab_size} tokens, the model only {vocab_size}")
    distinct = list(dict.fromkeys(c for c in constraints if c is not None))
    jsons = {c for c in distinct if isinstance(c, Json)}
    if len(jsons) > 1:
        raise ConstraintError("rows of one batch must share one JSON mode setting (max_depth, max_whitespace)")
    tables, start = [], {}
    offset, json_auto, json_offset = 1, None, 0
    for c in distinct:
        table = compile_table(c, tokenizer)
        if isinstance(c, Json):
            json_auto = automata.json_automaton(c.max_whitespace, c.allow_array)  # its byte moves (cheap)
            json_offset = offset
        tables.append((offset, table))
        start[c] = offset + table.initial
        offset += table.next.shape[0]

    # joint token classes: tokens every table treats alike share a column; ids beyond the
    # tokenizer's vocabulary get a class of their own, allowed only in the free state
    V = vocab_size
    per_table = np.stack([t.token_class for _, t in tables], axis=1)  # [tokenizer V, tables]
    per_table = np.concatenate([per_table, np.full((V - len(per_table), len(tables)), -1, np.int32)])
    joint, classes = np.unique(per_table, axis=0, return_inverse=True)
    next_ = np.full((offset, len(joint)), DEAD, np.int32)
    next_[0] = 0
    for i, (off, t) in enumerate(tables):
        body = np.where(joint[:, i][None] >= 0, t.next[:, np.maximum(joint[:, i], 0)], DEAD)
        next_[off : off + len(body)] = np.where(body >= 0, body + off, body)
    accepting, cost = np.zeros(offset, bool), np.zeros(offset, np.int32)
    accepting[0] = True
    for off, t in tables:
        accepting[off : off + len(t.accepting)] = t.accepting
        cost[off : off + len(t.cost)] = t.cost

    N, C = pow2_bucket(next_.shape[0]), pow2_bucket(next_.shape[1])
    next_ = np.pad(next_, ((0, N - next_.shape[0]), (0, C - next_.shape[1])), constant_values=DEAD)
    accepting = np.pad(accepting, (0, N - len(accepting)))
    cost = np.pad(cost, (0, N - len(cost)), constant_values=automata.FAR)
    stack = _stack_arrays(json_auto, tokenizer, V)
    meta = {}
    if json_auto is not None:
        meta = dict(json_offset=json_offset, after_value=json_auto.after_value, done=json_auto.done,
                    object_key=json_auto.object_key, value=json_auto.value, max_depth=next(iter(jsons)).max_depth)
    dtype = np.int16 if N < 2**15 else np.int32  # the table is gathered every step: half the bytes
    auto = Automaton(
        next=jnp.asarray(next_.astype(dtype)), token_class=jnp.asarray(classes.reshape(-1).astype(np.int32)),
        accepting=jnp.asarray(accepting),
        cost=jnp.asarray(cost),
        **{k: jnp.asarray(v) for k, v in stack.items()}, **meta,
    )
    B = len(constraints)
    init = np.array([0 if c is None else start[c] for c in constraints], np.int32)
    return auto, RowState(jnp.asarray(init), jnp.zeros((B,), jnp.int32), jnp.zeros((B,), jnp.int32))


def _stack_arrays(json_auto, tokenizer, V: int) -> dict:
    if json_auto is None:
        return dict(json_code=np.full((1, 256), DEAD, np.int32), stack_ids=np.zeros((0,), np.int32),
                    stack_bytes=np.zeros((0, 1), np.uint8), stack_len=np.zeros((0,), np.int32),
                    stack_slot=np.full((V,), -1, np.int32))
    token_bytes, lengths = tokenizer.token_bytes()
    ids = np.nonzero(_stack_tokens(token_bytes, lengths))[0].astype(np.int32)
    L = int(lengths[ids].max()) if len(ids) else 1
    slot = np.full((V,), -1, np.int32)
    slot[ids] = np.arange(len(ids), dtype=np.int32)
    return dict(json_code=json_auto.code, stack_ids=ids, stack_bytes=token_bytes[ids, :L],
                stack_len=lengths[ids], stack_slot=slot)


# ---------------------------------------------------------------------------- device: in the loop


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["entry", "ok", "local", "stack", "depth"], meta_fields=[]
)
@dataclasses.dataclass(frozen=True)
class Step:
    """What each token would do from each row's current state (computed once per step)."""

    entry: jax.Array  # [B, V] table entries: next state, DEAD or STACK
    ok: jax.Array  # [B, P] stack tokens: allowed
    local: jax.Array  # [B, P] their JSON local state afterwards
    stack: jax.Array  # [B, P]
    depth: jax.Array  # [B, P]


def _run_stack(auto: Automaton, rows: RowState):
    """Runs each stack token's bytes through the JSON automaton and the row's stack. -> [B, P] x 4"""
    B, P = rows.state.shape[0], auto.stack_ids.shape[0]
    local = jnp.broadcast_to(jnp.clip(rows.state - auto.json_offset, 0, auto.json_code.shape[0] - 1)[:, None], (B, P))
    stack = jnp.broadcast_to(rows.stack[:, None], (B, P))
    depth = jnp.broadcast_to(rows.depth[:, None], (B, P))
    ok = jnp.ones((B, P), bool)

    def byte(j, carry):
        local, stack, depth, ok = carry
        live = (j < auto.stack_len)[None] & ok
        code = auto.json_code[local, auto.stack_bytes[:, j][None].astype(jnp.int32)]
        action, target = code & 7, code >> 3
        top_is_array = ((stack >> jnp.maximum(depth - 1, 0)) & 1) == 1
        push = (action == automata.PUSH_OBJECT) | (action == automata.PUSH_ARRAY)
        pop = (action == automata.POP_OBJECT) | (action == automata.POP_ARRAY)
        bad = (code < 0) | (push & (depth >= auto.max_depth)) | ((pop | (action == automata.COMMA)) & (depth == 0))
        bad |= ((action == automata.POP_OBJECT) & top_is_array) | ((action == automata.POP_ARRAY) & ~top_is_array)
        new_depth = depth + push.astype(jnp.int32) - pop.astype(jnp.int32)
        bit = jnp.left_shift(jnp.int32(1), jnp.where(push, depth, jnp.maximum(depth - 1, 0)))
        new_stack = jnp.where(push & (action == automata.PUSH_ARRAY), stack | bit, jnp.where(pop, stack & ~bit, stack))
        new_local = jnp.where(pop, jnp.where(new_depth == 0, auto.done, auto.after_value), target)
        new_local = jnp.where(action == automata.COMMA, jnp.where(top_is_array, auto.value, auto.object_key), new_local)
        ok = ok & ~(live & bad)
        step = live & ~bad
        return (
            jnp.where(step, new_local, local), jnp.where(step, new_stack, stack), jnp.where(step, new_depth, depth), ok
        )

    local, stack, depth, ok = jax.lax.fori_loop(0, auto.stack_bytes.shape[1], byte, (local, stack, depth, ok))
    return ok, local, stack, depth


def step(auto: Automaton, rows: RowState) -> Step:
    """Every token's outcome from each row's state."""
    entry = auto.next[rows.state][:, auto.token_class].astype(jnp.int32)  # [B, V]
    if auto.uses_stack:
        ok, local, stack, depth = _run_stack(auto, rows)
    else:
        B = rows.state.shape[0]
        ok = local = stack = depth = jnp.zeros((B, 0), jnp.int32)
    return Step(entry, ok, local, stack, depth)


def allowed(auto: Automaton, rows: RowState, st: Step, eos_ids: jax.Array, budget: jax.Array) -> jax.Array:
    """bool [B, V]: the tokens each row may emit next.

    A token is allowed when the constraint accepts it and the output can still be finished
    within `budget` [B] more tokens after it (`cost`: shortest paths in tokens; JSON adds
    one token per open bracket), so a row cut by max_new_tokens still ends valid. EOS is
    allowed only in accepting states.
    """
    V = st.entry.shape[1]
    mask = (st.entry >= 0) & (auto.cost[jnp.maximum(st.entry, 0)] + rows.depth[:, None] <= budget[:, None])
    if auto.uses_stack:
        on_stack = st.entry[:, auto.stack_ids] == STACK  # [B, P]
        fits = auto.cost[st.local + auto.json_offset] + st.depth <= budget[:, None]
        mask = mask.at[:, auto.stack_ids].set(jnp.where(on_stack, st.ok & fits, mask[:, auto.stack_ids]))
    return jnp.where(eos_mask(eos_ids, V), auto.accepting[rows.state][:, None], mask)


def mask(auto: Automaton, rows: RowState, eos_ids: jax.Array, budget: jax.Array) -> tuple[jax.Array, Step]:
    """`allowed` and the `Step` to `advance` with, in one call. -> (bool [B, V], Step)"""
    outcome = step(auto, rows)
    return allowed(auto, rows, outcome, eos_ids, budget), outcome


def advance(auto: Automaton, rows: RowState, st: Step, token: jax.Array, moved: jax.Array) -> RowState:
    """The rows' states after `token` [B]; rows where `moved` [B] is False keep theirs."""
    B = token.shape[0]
    entry = jnp.take_along_axis(st.entry, token[:, None], axis=1)[:, 0]
    state, stack, depth = jnp.where(entry >= 0, entry, rows.state), rows.stack, rows.depth
    if auto.uses_stack:
        slot = jnp.maximum(auto.stack_slot[token], 0)
        rows_ = jnp.arange(B)
        by_stack = entry == STACK
        state = jnp.where(by_stack, st.local[rows_, slot] + auto.json_offset, state)
        stack = jnp.where(by_stack, st.stack[rows_, slot], stack)
        depth = jnp.where(by_stack, st.depth[rows_, slot], depth)
    return RowState(
        jnp.where(moved, state, rows.state), jnp.where(moved, stack, rows.stack), jnp.where(moved, depth, rows.depth)
    )
