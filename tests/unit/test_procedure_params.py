"""Procedure parameters are bounded before a job exists (issue 17, item 6).

Declared types and ranges decide; NaN and infinities only where a parameter allows them;
sizes and nesting bounded; every refusal a ParameterError (never OverflowError or
RecursionError), whatever the value.
"""

from __future__ import annotations

import math

import pytest
from labctl.ioc.config.procedures import ParamConfig
from labctl.ioc.procedure import ParameterError, convert_param


def nested(depth: int) -> list:
    out: list = []
    for _ in range(depth):
        out = [out]
    return out


F64, INT, BOOL, TEXT, ARRAY = (ParamConfig(type=t) for t in ("float64", "int", "bool", "string", "float64[]"))


@pytest.mark.parametrize(
    ("p", "value"),
    [
        (F64, 10**400), (F64, math.nan), (F64, math.inf), (F64, "1e999"), (F64, "nan"), (F64, [1.0]), (F64, True), (F64, "9" * 100),
        (INT, 10**400), (INT, 2**63), (INT, math.inf), (INT, math.nan), (INT, 1.5), (INT, "1" * 100), (INT, True), (INT, {}),
        (BOOL, [True]), (BOOL, 2), (BOOL, "maybe"),
        (TEXT, {"a": 1}), (TEXT, ["x"]), (TEXT, "x" * 1025),
        (ARRAY, [math.nan]), (ARRAY, [0.1, math.inf]), (ARRAY, "0.1,nan"), (ARRAY, nested(10_000)), (ARRAY, [[0.1]]),
        (ARRAY, [0.0] * 1001), (ARRAY, [10**400]), (ARRAY, 0.5), (ARRAY, [True]),
        (ParamConfig(type="float64", min=0, max=1), 1.5), (ParamConfig(type="float64[]", max=1), [0.5, 2.0]),
    ],
)  # fmt: skip
def test_bad_values_are_parameter_errors(p, value):
    with pytest.raises(ParameterError) as e:
        convert_param("x", p, value)
    assert str(e.value).startswith("parameter 'x': ") and len(str(e.value)) < 400


@pytest.mark.parametrize(
    ("p", "value", "expected"),
    [
        (F64, "0.5", 0.5), (F64, 2, 2.0), (INT, 3.0, 3), (INT, "-7", -7), (BOOL, "true", True), (BOOL, 0, False),
        (TEXT, 12, "12"), (ARRAY, "0.1, 0.2", [0.1, 0.2]), (ARRAY, [1, 2.5], [1.0, 2.5]), (ARRAY, "", []),
    ],
)  # fmt: skip
def test_good_values_convert(p, value, expected):
    assert convert_param("x", p, value) == expected


def test_a_parameter_may_allow_nonfinite_values():
    p = ParamConfig(type="float64[]", allow_nonfinite=True, max_items=3)
    assert math.isnan(convert_param("x", p, ["nan"])[0]) and convert_param("x", p, [math.inf]) == [math.inf]
    with pytest.raises(ParameterError):
        convert_param("x", p, [0.0] * 4)
