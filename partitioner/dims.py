"""Symbolic sizes in a plan (``"seq"``, ``"past + seq"``, ``"batch*seq"``), parsed by a grammar.

A plan's shapes name dynamic dims; the executor evaluates them at a call's binding to draw
pads of the right size. The text comes from a file, so it is never given to ``eval`` or
``sympy.sympify`` (both run code). The grammar is the closed set the compiler writes::

    expr   := term (("+" | "-") term)*
    term   := factor (("*" | "//") factor)*
    factor := INT | NAME | "(" expr ")" | "-" factor

Anything else is a :class:`ValueError` naming the text; the compiler checks every size it
writes against the same grammar (``ShapeContext.dim``), so a plan it saved always parses.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

_TOKEN = re.compile(r"\s*(?:(\d+)|([A-Za-z_][A-Za-z0-9_]*)|(//|[-+*()]))")
_MAX_LENGTH = 256  # a size expression is short; refuse megabytes of text before tokenising

# stages are exported (and compiled) at these example sizes, >= 2 so no dim specialises to 0/1
EXPORT_SIZES = {"batch": 2}
EXPORT_DEFAULT = 17


def _tokens(text: str) -> list[str]:
    if len(text) > _MAX_LENGTH:
        raise ValueError(f"size expression of {len(text)} characters is too long")
    out: list[str] = []
    pos = 0
    text = text.rstrip()
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None:
            raise ValueError(f"size expression {text!r}: unexpected {text[pos : pos + 8]!r}")
        out.append(match.group(match.lastindex or 0))
        pos = match.end()
    return out


class _Parser:
    def __init__(self, text: str, binding: Mapping[str, int] | None) -> None:
        self.text = text
        self.tokens = _tokens(text)
        self.pos = 0
        self.binding = binding
        self.names: set[str] = set()
        self.depth = 0

    def _peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def _next(self) -> str:
        token = self._peek()
        if token is None:
            raise ValueError(f"size expression {self.text!r} ends early")
        self.pos += 1
        return token

    def parse(self) -> int:
        value = self.expr()
        if self._peek() is not None:
            raise ValueError(f"size expression {self.text!r}: unexpected {self._peek()!r}")
        return value

    def expr(self) -> int:
        value = self.term()
        while self._peek() in ("+", "-"):
            op = self._next()
            rhs = self.term()
            value = value + rhs if op == "+" else value - rhs
        return value

    def term(self) -> int:
        value = self.factor()
        while self._peek() in ("*", "//"):
            op = self._next()
            rhs = self.factor()
            if op == "*":
                value *= rhs
            elif self.binding is None:
                value = 0
            elif rhs == 0:
                raise ValueError(f"size expression {self.text!r} divides by zero")
            else:
                value //= rhs
        return value

    def factor(self) -> int:
        self.depth += 1
        if self.depth > 32:
            raise ValueError(f"size expression {self.text!r} nests too deeply")
        try:
            token = self._next()
            if token == "(":
                value = self.expr()
                if self._next() != ")":
                    raise ValueError(f"size expression {self.text!r}: unbalanced parentheses")
                return value
            if token == "-":
                return -self.factor()
            if token.isdigit():
                return int(token)
            if token[0].isalpha() or token[0] == "_":
                self.names.add(token)
                if self.binding is None:
                    return 0
                if token not in self.binding:
                    raise ValueError(f"size expression {self.text!r}: {token} is not bound")
                return int(self.binding[token])
            raise ValueError(f"size expression {self.text!r}: unexpected {token!r}")
        finally:
            self.depth -= 1


def evaluate(text: str, binding: Mapping[str, int]) -> int:
    """The value of a size expression at ``binding`` (``ValueError`` if malformed/unbound)."""
    return _Parser(text, binding).parse()


def names_in(text: str) -> set[str]:
    """The dim names a size expression uses; checks it against the grammar."""
    parser = _Parser(text, None)
    parser.parse()
    return parser.names


def concrete_shape(shape: list[int | str], binding: Mapping[str, int]) -> list[int]:
    """A plan shape (ints and size expressions) at a binding; every size must be >= 0."""
    out = []
    for size in shape:
        value = size if isinstance(size, int) else evaluate(size, binding)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"shape {shape} has a negative or non-integer size: {size}")
        out.append(value)
    return out
