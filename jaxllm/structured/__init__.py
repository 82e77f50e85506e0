"""Structured output: constraints a generation must satisfy, enforced inside the decode loop.

Three layers, each using only the one below it:

    regexp.py       a regex subset → a DFA over UTF-8 bytes
    automata.py     byte automata: regexes, choices (a trie), JSON and its stack moves, JSON
                    Schema → regex; the walk of every token's bytes from every state
    constraints.py  what users write (`Regex`, `Choice`, `Json`, `JsonSchema`), the per-tokenizer
                    token tables, `build` (one `Automaton` pytree per batch), the in-loop
                    `mask`/`advance`, and `verify` for finished texts

    generate(..., constraint=Regex(r"[0-9]{3}"))   # or a list, one per prompt
"""

from jaxllm.structured.automata import choices_dfa, regex_dfa, schema_regex
from jaxllm.structured.constraints import (
    Automaton,
    Choice,
    Constraint,
    Json,
    JsonSchema,
    Regex,
    RowState,
    TokenTable,
    advance,
    build,
    compile_table,
    mask,
    verify,
    verify_all,
)

__all__ = [
    "Automaton",
    "Choice",
    "Constraint",
    "Json",
    "JsonSchema",
    "Regex",
    "RowState",
    "TokenTable",
    "advance",
    "build",
    "choices_dfa",
    "compile_table",
    "mask",
    "regex_dfa",
    "schema_regex",
    "verify",
    "verify_all",
]
