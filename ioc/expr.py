"""A small, safe expression language for derived PVs.

Expressions use Python's syntax but only this subset of it, checked when the site file
is loaded and evaluated by walking the tree (``eval`` is never called):

* numbers, ``true``/``false``, strings (only as table names), and the variables that the
  PV's ``inputs`` bind to PV values;
* ``+ - * / // % **``, unary ``-``/``+``/``not``, comparisons (chained too),
  ``and``/``or``, and ``a if cond else b``;
* the functions in :data:`FUNCTIONS`: ``abs min max sqrt exp log log10 sin cos tan
  clip(x, lo, hi) round(x[, n]) floor ceil isnan`` and ``interp(x, 'table')``, which
  interpolates linearly in a calibration table from the site file (points sorted by x;
  outside the table the value is NaN, so the PV reads INVALID rather than extrapolating).

Attribute access, subscripts, comprehensions, lambdas, calls of anything not listed,
and names not bound by ``inputs`` are refused with the position in the expression.
Exponents are bounded so an expression cannot consume the server's CPU.
"""

from __future__ import annotations

import ast
import bisect
import math
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any


class ExpressionError(ValueError):
    """An expression is not valid (raised when the site file is loaded)."""


class EvaluationError(ArithmeticError):
    """An expression failed for the given inputs (division by zero, domain error...)."""


def _clip(x: float, lo: float, hi: float) -> float:
    return min(max(x, lo), hi)


def _log(x: float, base: float | None = None) -> float:
    return math.log(x) if base is None else math.log(x, base)


FUNCTIONS: dict[str, tuple[Callable[..., Any], int, int]] = {
    # name: (function, min args, max args)
    "abs": (abs, 1, 1),
    "min": (min, 2, 16),
    "max": (max, 2, 16),
    "sqrt": (math.sqrt, 1, 1),
    "exp": (math.exp, 1, 1),
    "log": (_log, 1, 2),
    "log10": (math.log10, 1, 1),
    "sin": (math.sin, 1, 1),
    "cos": (math.cos, 1, 1),
    "tan": (math.tan, 1, 1),
    "clip": (_clip, 3, 3),
    "round": (round, 1, 2),
    "floor": (math.floor, 1, 1),
    "ceil": (math.ceil, 1, 1),
    "isnan": (math.isnan, 1, 1),
}

_BINOPS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_CMPOPS: dict[type, Callable[[Any, Any], bool]] = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
}
_CONSTANTS = {"true": True, "false": False, "pi": math.pi, "nan": math.nan}
MAX_EXPONENT = 1000


@dataclass(frozen=True)
class Table:
    """A calibration table: (x, y) points, x strictly increasing."""

    xs: tuple[float, ...]
    ys: tuple[float, ...]

    @classmethod
    def from_points(cls, name: str, points: Sequence[Sequence[float]]) -> Table:
        """Sort-check and build; raise ExpressionError naming the table if malformed."""
        if len(points) < 2:
            raise ExpressionError(f"table {name!r} needs at least 2 points, has {len(points)}")
        xs = tuple(float(p[0]) for p in points)
        ys = tuple(float(p[1]) for p in points)
        if any(b <= a for a, b in zip(xs, xs[1:], strict=False)):
            raise ExpressionError(f"table {name!r}: x values must be strictly increasing")
        return cls(xs, ys)

    def __call__(self, x: float) -> float:
        """Linear interpolation; NaN outside the table."""
        xs, ys = self.xs, self.ys
        if math.isnan(x) or x < xs[0] or x > xs[-1]:
            return math.nan
        i = bisect.bisect_right(xs, x)
        if i >= len(xs):
            return ys[-1]
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


class Expression:
    """A parsed, checked expression. Call :meth:`evaluate` with the variable values."""

    def __init__(self, source: str, variables: Sequence[str], tables: Mapping[str, Table] | None = None) -> None:
        self.source = source
        self.variables = frozenset(variables)
        self.tables = dict(tables or {})
        try:
            tree = ast.parse(source.strip(), mode="eval")
        except SyntaxError as e:
            raise ExpressionError(f"syntax error at column {e.offset}: {e.msg}") from None
        self._tree = tree.body
        self._check(self._tree)

    def _fail(self, node: ast.AST, what: str) -> ExpressionError:
        col = getattr(node, "col_offset", None)
        where = f" at column {col + 1}" if col is not None else ""
        return ExpressionError(f"{what}{where}")

    def _check(self, node: ast.AST) -> None:
        if isinstance(node, ast.Constant):
            if isinstance(node.value, str):
                raise self._fail(node, "strings are only allowed as table names in interp()")
            if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
                raise self._fail(node, f"constant {node.value!r} is not allowed")
        elif isinstance(node, ast.Name):
            if node.id not in self.variables and node.id not in _CONSTANTS:
                known = sorted(self.variables)
                raise self._fail(node, f"unknown name {node.id!r} (inputs are {known})")
        elif isinstance(node, ast.BinOp):
            if type(node.op) not in _BINOPS:
                raise self._fail(node, f"operator {type(node.op).__name__} is not allowed")
            self._check(node.left)
            self._check(node.right)
        elif isinstance(node, ast.UnaryOp):
            if not isinstance(node.op, (ast.USub, ast.UAdd, ast.Not)):
                raise self._fail(node, f"operator {type(node.op).__name__} is not allowed")
            self._check(node.operand)
        elif isinstance(node, ast.BoolOp):
            for v in node.values:
                self._check(v)
        elif isinstance(node, ast.Compare):
            for op in node.ops:
                if type(op) not in _CMPOPS:
                    raise self._fail(node, f"comparison {type(op).__name__} is not allowed")
            self._check(node.left)
            for c in node.comparators:
                self._check(c)
        elif isinstance(node, ast.IfExp):
            self._check(node.test)
            self._check(node.body)
            self._check(node.orelse)
        elif isinstance(node, ast.Call):
            self._check_call(node)
        else:
            raise self._fail(node, f"{type(node).__name__} is not allowed in an expression")

    def _check_call(self, node: ast.Call) -> None:
        if not isinstance(node.func, ast.Name):
            raise self._fail(node, "only the listed functions may be called")
        name = node.func.id
        if node.keywords:
            raise self._fail(node, f"{name}() takes no keyword arguments")
        if name == "interp":
            if len(node.args) != 2 or not (isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)):
                raise self._fail(node, "interp(x, 'table') takes a value and a quoted table name")
            table = node.args[1].value
            if table not in self.tables:
                raise self._fail(node, f"unknown table {table!r} (tables are {sorted(self.tables)})")
            self._check(node.args[0])
            return
        if name not in FUNCTIONS:
            raise self._fail(node, f"unknown function {name!r} (allowed: {', '.join(sorted([*FUNCTIONS, 'interp']))})")
        _, lo, hi = FUNCTIONS[name]
        if not lo <= len(node.args) <= hi:
            raise self._fail(node, f"{name}() takes {lo}..{hi} arguments, got {len(node.args)}")
        for a in node.args:
            self._check(a)

    def evaluate(self, values: Mapping[str, Any]) -> Any:
        """Evaluate with the given variable values; raise EvaluationError on a math error."""
        try:
            return self._eval(self._tree, values)
        except (ZeroDivisionError, OverflowError, ValueError, TypeError) as e:
            raise EvaluationError(f"{self.source}: {e}") from None

    def _eval(self, node: ast.AST, env: Mapping[str, Any]) -> Any:
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            return env[node.id] if node.id in self.variables else _CONSTANTS[node.id]
        if isinstance(node, ast.BinOp):
            left, right = self._eval(node.left, env), self._eval(node.right, env)
            if isinstance(node.op, ast.Pow) and isinstance(right, (int, float)) and abs(right) > MAX_EXPONENT:
                raise ValueError(f"exponent {right} is larger than {MAX_EXPONENT}")
            return _BINOPS[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp):
            v = self._eval(node.operand, env)
            if isinstance(node.op, ast.Not):
                return not v
            return -v if isinstance(node.op, ast.USub) else +v
        if isinstance(node, ast.BoolOp):
            if isinstance(node.op, ast.And):
                result: Any = True
                for v in node.values:
                    result = self._eval(v, env)
                    if not result:
                        return result
                return result
            result = False
            for v in node.values:
                result = self._eval(v, env)
                if result:
                    return result
            return result
        if isinstance(node, ast.Compare):
            left = self._eval(node.left, env)
            for op, comp in zip(node.ops, node.comparators, strict=False):
                right = self._eval(comp, env)
                if not _CMPOPS[type(op)](left, right):
                    return False
                left = right
            return True
        if isinstance(node, ast.IfExp):
            return self._eval(node.body, env) if self._eval(node.test, env) else self._eval(node.orelse, env)
        if isinstance(node, ast.Call):
            name = node.func.id  # type: ignore[attr-defined]
            if name == "interp":
                return self.tables[node.args[1].value](float(self._eval(node.args[0], env)))  # type: ignore[attr-defined]
            fn = FUNCTIONS[name][0]
            return fn(*(self._eval(a, env) for a in node.args))
        raise AssertionError(f"unchecked node {node!r}")  # pragma: no cover
