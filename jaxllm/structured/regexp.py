"""Regular expressions compiled straight to DFAs over UTF-8 bytes.

The subset of Python's `re` that constraints need: literals, escapes (`\\d \\w \\s \\D \\W \\S`,
`\\n \\t \\r \\f \\v \\0 \\0oo \\xHH \\uHHHH` and escaped punctuation), classes `[a-z_]` and
`[^...]`, `.` (any character but a newline), groups `( )` and `(?: )`, `|`, and the quantifiers
`* + ? {m} {m,} {m,n}` (a trailing `?` for laziness is accepted and means nothing here).
Matching is always a full match; `^` at the start and `$` at the end are allowed. Classes
are ASCII (as with `re.ASCII`); a negated class may only exclude ASCII characters. What is
accepted means what Python's `re.fullmatch` means (constraints verify outputs with it), so a
pattern Python reads differently is refused: a quantifier after a quantifier (`a**`, the
possessive `a*+`), `^`/`$` elsewhere, a class as a range's end (`[\\d-z]`). A surrogate
(`\\ud800`) matches nothing: UTF-8 cannot encode it. Patterns whose automaton would exceed
`MAX_NFA_STATES` / `MAX_DFA_STATES` are refused (`.{0,1000}` is about 11,000 DFA states).

    pattern ──parse──▶ tree ──Thompson──▶ byte NFA ──subsets over byte classes──▶ DFA [N, 256]

Written here because a schema's regex has hundreds of states: the subset construction
works on the few classes of bytes the pattern distinguishes, not on all 256 bytes.
"""

from __future__ import annotations

import numpy as np

from jaxllm.errors import ConstraintError

ASCII = (1 << 128) - 1
_DIGIT = sum(1 << b for b in range(48, 58))
_WORD = _DIGIT | sum(1 << b for b in (*range(65, 91), *range(97, 123), 95))
_SPACE = sum(1 << b for b in b" \t\n\r\f\v")
_SURROGATES = (0xD800, 0xDFFF)
_CLASSES = {"d": (_DIGIT, False), "w": (_WORD, False), "s": (_SPACE, False),
            "D": (ASCII & ~_DIGIT, True), "W": (ASCII & ~_WORD, True), "S": (ASCII & ~_SPACE, True)}
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "f": "\f", "v": "\v"}

# Past these, compiling takes many seconds and the token table (states x vocabulary) gigabytes;
# bounded repetitions multiply states: .{0,1000} needs 11,000 DFA states, a{1000}{1000} would need 10^6.
MAX_NFA_STATES, MAX_DFA_STATES = 200_000, 20_000

# A tree node: ("set", ascii_mask, any_non_ascii, extra_chars) | ("seq", [nodes]) | ("alt", [nodes])
# | ("rep", node, lo, hi or None)


class _Parser:
    def __init__(self, pattern: str):
        self.p, self.i = pattern, 0

    def fail(self, why: str):
        shown = repr(self.p) if len(self.p) <= 200 else f"{self.p[:200]!r}... ({len(self.p):,} characters)"
        raise ConstraintError(f"cannot use regex {shown}: {why} at position {self.i}")

    def peek(self) -> str | None:
        return self.p[self.i] if self.i < len(self.p) else None

    def take(self) -> str:
        if self.i >= len(self.p):
            self.fail("unexpected end")
        self.i += 1
        return self.p[self.i - 1]

    def parse(self):
        if self.peek() == "^":
            self.i += 1
        node = self.alt()
        if self.i < len(self.p):
            self.fail(f"unexpected {self.p[self.i]!r}")
        return node

    def alt(self):
        branches = [self.seq()]
        while self.peek() == "|":
            self.i += 1
            branches.append(self.seq())
        return branches[0] if len(branches) == 1 else ("alt", branches)

    def seq(self):
        items = []
        while self.peek() not in (None, "|", ")"):
            if self.peek() == "$" and self.i == len(self.p) - 1:
                self.i += 1
                break
            items.append(self.quantified(self.atom()))
        return ("seq", items)

    def quantified(self, node):
        c = self.peek()
        if c in ("*", "+", "?"):
            self.i += 1
            node = ("rep", node, 1 if c == "+" else 0, 1 if c == "?" else None)
        elif c == "{" and self._bounds() is not None:
            lo, hi = self._bounds(consume=True)
            node = ("rep", node, lo, hi)
        else:
            return node
        if self.peek() == "?":  # lazy: the same language
            self.i += 1
        if self._at_quantifier():  # Python refuses "a**"; "a*+" is possessive there (3.11+), another language
            self.fail("a quantifier cannot follow another (possessive quantifiers are not supported)")
        return node

    def _at_quantifier(self) -> bool:
        return self.peek() in ("*", "+", "?") or (self.peek() == "{" and self._bounds() is not None)

    def _bounds(self, consume: bool = False):
        end = self.p.find("}", self.i)
        body = self.p[self.i + 1 : end] if end > 0 else ""
        parts = body.split(",")
        digits = lambda t: t != "" and all(d in "0123456789" for d in t)  # noqa: E731  (str.isdigit takes "٣")
        if end < 0 or len(parts) > 2 or not (digits(parts[0]) or (parts[0] == "" and len(parts) == 2)):
            return None
        if len(parts) == 2 and parts[1] and not digits(parts[1]):
            return None
        if max(map(len, parts)) > 9:  # past the automaton's size limit anyway (and int() of 5,000 digits fails)
            self.fail("repetition count too large")
        lo = int(parts[0] or 0)
        hi = lo if len(parts) == 1 else (int(parts[1]) if parts[1] else None)
        if hi is not None and hi < lo:
            self.fail(f"bad repetition {{{body}}}")
        if consume:
            self.i = end + 1
        return lo, hi

    def atom(self):
        c = self.peek()
        if self._at_quantifier():
            self.fail(f"nothing to repeat before {c!r}")
        if c in ("^", "$"):  # anchors inside a pattern: Python's meaning is not a character
            self.fail(f"{c!r} is only supported at the {'start' if c == '^' else 'end'} of the pattern")
        c = self.take()
        if c == "(":
            if self.p.startswith("?:", self.i):
                self.i += 2
            elif self.peek() == "?":
                self.fail("only (?:...) groups are supported")
            node = self.alt()
            if self.take() != ")":
                self.fail("missing )")
            return node
        if c == "[":
            return self.char_class()
        if c == ".":
            return ("set", ASCII & ~(1 << 10), True, frozenset())
        if c == "\\":
            item = self.escape()
            return item if item[0] == "set" else _char(item[1])
        return _char(c)

    def escape(self):
        """After a backslash -> ("char", c) or a ("set", ...) node."""
        c = self.take()
        if c in _CLASSES:
            mask, non_ascii = _CLASSES[c]
            return ("set", mask, non_ascii, frozenset())
        if c == "0":  # \0 and up to two more octal digits, as in Python
            digits = "0"
            while len(digits) < 3 and self.peek() is not None and self.peek() in "01234567":
                digits += self.take()
            return ("char", chr(int(digits, 8)))
        if c in _ESCAPES:
            return ("char", _ESCAPES[c])
        if c in "xu":
            n = 2 if c == "x" else 4
            digits = self.p[self.i : self.i + n]
            if len(digits) != n or any(d not in "0123456789abcdefABCDEF" for d in digits):
                self.fail(f"bad \\{c} escape")
            self.i += n
            return ("char", chr(int(digits, 16)))
        if c.isalnum():
            self.fail(f"unsupported escape \\{c}")
        return ("char", c)

    def class_item(self):
        c = self.take()
        return self.escape() if c == "\\" else ("char", c)

    def char_class(self):
        negate = self.peek() == "^"
        if negate:
            self.i += 1
        mask, non_ascii, extra = 0, False, set()
        first = True
        while True:
            if self.peek() == "]" and not first:
                self.i += 1
                break
            first = False
            item = self.class_item()
            if item[0] == "set":
                if self.peek() == "-" and self.p[self.i + 1 : self.i + 2] not in ("]", ""):
                    self.fail("bad range in a class")  # [\d-z]: Python refuses a class as a range's end
                mask, non_ascii = mask | item[1], non_ascii or item[2]
                continue
            lo = hi = item[1]
            if self.peek() == "-" and self.p[self.i + 1 : self.i + 2] not in ("]", ""):
                self.i += 1
                end = self.class_item()
                if end[0] != "char" or ord(end[1]) < ord(lo):
                    self.fail("bad range in a class")
                hi = end[1]
            if ord(hi) >= 128 and ord(hi) - max(ord(lo), 128) > 4096:
                self.fail("non-ASCII ranges wider than 4096 characters are not supported")
            for o in range(ord(lo), ord(hi) + 1):
                if o < 128:
                    mask |= 1 << o
                elif not _SURROGATES[0] <= o <= _SURROGATES[1]:
                    extra.add(chr(o))
        if negate:
            if extra:
                self.fail("a negated class may only exclude ASCII characters")
            return ("set", ASCII & ~mask, not non_ascii, frozenset())
        return ("set", mask, non_ascii, frozenset() if non_ascii else frozenset(extra))


def _char(c: str):
    if _SURROGATES[0] <= ord(c) <= _SURROGATES[1]:
        return ("set", 0, False, frozenset())  # UTF-8 cannot encode it, so no output holds it: matches nothing
    return ("set", 1 << ord(c), False, frozenset()) if ord(c) < 128 else ("set", 0, False, frozenset([c]))


# ---------------------------------------------------------------------------- NFA


class _NFA:
    def __init__(self):
        self.eps: list[list[int]] = []
        self.edges: list[list[tuple[int, int]]] = []  # (byte mask, target)

    def state(self) -> int:
        if len(self.eps) >= MAX_NFA_STATES:
            raise _too_large(MAX_NFA_STATES)
        self.eps.append([])
        self.edges.append([])
        return len(self.eps) - 1

    def build(self, node) -> tuple[int, int]:
        kind = node[0]
        s, e = self.state(), self.state()
        if kind == "set":
            _, mask, any_non_ascii, chars = node
            if mask:
                self.edges[s].append((mask, e))
            if any_non_ascii:
                self._utf8_any(s, e)
            for ch in chars:
                enc = ch.encode("utf-8")
                cur = s
                for b in enc[:-1]:
                    nxt = self.state()
                    self.edges[cur].append((1 << b, nxt))
                    cur = nxt
                self.edges[cur].append((1 << enc[-1], e))
        elif kind == "seq":
            cur = s
            for item in node[1]:
                a, b = self.build(item)
                self.eps[cur].append(a)
                cur = b
            self.eps[cur].append(e)
        elif kind == "alt":
            for item in node[1]:
                a, b = self.build(item)
                self.eps[s].append(a)
                self.eps[b].append(e)
        else:  # rep
            _, item, lo, hi = node
            cur = s
            for _ in range(lo):
                a, b = self.build(item)
                self.eps[cur].append(a)
                cur = b
            if hi is None:  # x*: loop through one more copy
                a, b = self.build(item)
                self.eps[cur] += [a]
                self.eps[b] += [cur]
            else:  # x{0,k} as (x(x(...)?)?)?: each copy may end the repeat, so an epsilon closure
                # holds O(1) copies' starts, not all k (x?x?...x? made subsets O(k) large: O(k^2) work)
                for _ in range(hi - lo):
                    a, b = self.build(item)
                    self.eps[cur] += [a, e]
                    cur = b
            self.eps[cur].append(e)
        return s, e

    def _utf8_any(self, s: int, e: int) -> None:
        """Any well-formed multi-byte UTF-8 character from s to e: no overlong forms, surrogates
        or code points past U+10FFFF (the second byte's range depends on the first byte)."""
        cont = _byte_range(0x80, 0xBF)
        tails = [e]  # tails[k]: k more continuation bytes reach e
        for _ in range(2):
            t = self.state()
            self.edges[t].append((cont, tails[-1]))
            tails.append(t)
        for first, second, rest in _UTF8_LEADS:
            mid = self.state()
            self.edges[s].append((_byte_range(*first), mid))
            self.edges[mid].append((_byte_range(*second), tails[rest]))


def _byte_range(lo: int, hi: int) -> int:
    return sum(1 << b for b in range(lo, hi + 1))


# Well-formed UTF-8 beyond ASCII (the Unicode standard's table 3-7): (first byte range, second
# byte range, continuation bytes after the second)
_UTF8_LEADS = (
    ((0xC2, 0xDF), (0x80, 0xBF), 0),
    ((0xE0, 0xE0), (0xA0, 0xBF), 1), ((0xE1, 0xEC), (0x80, 0xBF), 1), ((0xED, 0xED), (0x80, 0x9F), 1),
    ((0xEE, 0xEF), (0x80, 0xBF), 1),
    ((0xF0, 0xF0), (0x90, 0xBF), 2), ((0xF1, 0xF3), (0x80, 0xBF), 2), ((0xF4, 0xF4), (0x80, 0x8F), 2),
)


def _too_large(limit: int) -> ConstraintError:
    return ConstraintError(f"the regex needs more than {limit:,} automaton states: shorten its bounded repetitions "
                           f"(x{{m,n}}; in a JSON Schema maxLength, maxItems) or alternatives")


def compile_regex(pattern: str) -> tuple[np.ndarray, np.ndarray]:
    """pattern -> (trans [N, 256] int32, -1 = no move; accepting [N] bool); state 0 is the start."""
    nfa = _NFA()
    start, end = nfa.build(_Parser(pattern).parse())
    # byte classes: bytes that every edge treats alike
    masks = sorted({m for edges in nfa.edges for m, _ in edges})
    signature = [tuple((m >> b) & 1 for m in masks) for b in range(256)]
    ids: dict[tuple, int] = {}
    byte_class = np.array([ids.setdefault(sig, len(ids)) for sig in signature], np.int32)
    members = [[b for b in range(256) if byte_class[b] == c] for c in range(len(ids))]
    edge_classes = {m: [c for c in range(len(ids)) if (m >> members[c][0]) & 1] for m in masks}

    closures: dict[int, frozenset] = {}

    def closure(s: int) -> frozenset:
        if s not in closures:
            seen, todo = {s}, [s]
            while todo:
                for t in nfa.eps[todo.pop()]:
                    if t not in seen:
                        seen.add(t)
                        todo.append(t)
            closures[s] = frozenset(seen)
        return closures[s]

    first = closure(start)
    index, sets, rows = {first: 0}, [first], []
    while len(rows) < len(sets):
        current = sets[len(rows)]
        moves: dict[int, set] = {}
        for s in current:
            for m, t in nfa.edges[s]:
                for c in edge_classes[m]:
                    moves.setdefault(c, set()).add(t)
        row = np.full(len(ids), -1, np.int32)
        for c, targets in moves.items():
            target = frozenset().union(*(closure(t) for t in targets))
            if target not in index:
                if len(sets) >= MAX_DFA_STATES:
                    raise _too_large(MAX_DFA_STATES)
                index[target] = len(sets)
                sets.append(target)
            row[c] = index[target]
        rows.append(row)
    trans = np.stack(rows)[:, byte_class]
    accepting = np.array([end in s for s in sets], bool)
    return trans.astype(np.int32), accepting
