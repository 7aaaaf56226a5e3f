"""The derived-PV expression language: what it computes and what it refuses."""

from __future__ import annotations

import math

import pytest
from labctl.ioc.expr import EvaluationError, Expression, ExpressionError, Table

CAL = {"rox": Table.from_points("rox", [(1000.0, 4.0), (2000.0, 1.0), (5000.0, 0.1)])}


@pytest.mark.parametrize(
    ("src", "env", "expected"),
    [
        ("v * i", {"v": 2.0, "i": 3.0}, 6.0),
        ("(a + b) / 2", {"a": 1, "b": 2}, 1.5),
        ("a ** 2 - 1", {"a": 3}, 8),
        ("max(a, b, 0)", {"a": -1, "b": -2}, 0),
        ("clip(a, 0, 1)", {"a": 5}, 1),
        ("a if a > 0 else -a", {"a": -4}, 4),
        ("1 < a < 3", {"a": 2}, True),
        ("a > 1 and not b", {"a": 2, "b": False}, True),
        ("sqrt(a) + log10(100)", {"a": 9}, 5.0),
        ("interp(r, 'rox')", {"r": 1500.0}, 2.5),
        ("round(a, 1)", {"a": 1.26}, 1.3),
        ("a * 1e-3", {"a": 1500}, 1.5),
    ],
)
def test_evaluates(src, env, expected):
    assert Expression(src, list(env), CAL).evaluate(env) == pytest.approx(expected)


def test_interp_outside_the_table_is_nan():
    assert math.isnan(Expression("interp(r, 'rox')", ["r"], CAL).evaluate({"r": 10.0}))


@pytest.mark.parametrize(
    ("src", "words"),
    [
        ("__import__('os').system('ls')", "only the listed functions"),
        ("open('x')", "unknown function 'open'"),
        ("a.real", "Attribute is not allowed"),
        ("a[0]", "Subscript is not allowed"),
        ("[x for x in a]", "ListComp is not allowed"),
        ("lambda: 1", "Lambda is not allowed"),
        ("b + 1", "unknown name 'b'"),
        ("interp(a, 'nope')", "unknown table 'nope'"),
        ("interp(a, b)", "quoted table name"),
        ("sqrt(a, a)", "takes 1..1 arguments"),
        ("a +", "syntax error"),
        ("'text' + a", "strings are only allowed"),
        ("a @ a", "MatMult"),
        ("max(a, key=a)", "no keyword"),
    ],
)
def test_refuses_at_load_time(src, words):
    with pytest.raises(ExpressionError, match=None) as e:
        Expression(src, ["a"], CAL)
    assert words in str(e.value)


def test_math_errors_surface_as_evaluation_errors():
    with pytest.raises(EvaluationError):
        Expression("1 / a", ["a"]).evaluate({"a": 0})
    with pytest.raises(EvaluationError):
        Expression("sqrt(a)", ["a"]).evaluate({"a": -1})
    with pytest.raises(EvaluationError, match="exponent"):
        Expression("a ** 100000", ["a"]).evaluate({"a": 10})


def test_tables_must_increase():
    with pytest.raises(ExpressionError, match="strictly increasing"):
        Table.from_points("bad", [(1, 1), (1, 2)])
