"""Procedures: checking a site file's procedures and a submitter's parameters.

A procedure is data (see :class:`labctl.ioc.config.procedures.ProcedureConfig`): parameters, the resources
it locks, and steps (set, ramp, wait, read, sleep, repeat, log). Values in steps are
literals, or expressions when written ``=...`` (``value: "=sp * 1.1"``), evaluated with
the safe expression language of :mod:`labctl.ioc.expr` over the parameters and the variables of
enclosing ``repeat`` steps. Everything is checked when the site file loads, so a job
never fails half-way for a typo: the ``steps`` and the ``cleanup`` steps alike.
:func:`unused_params` lists parameters no step uses (a ``settle_s`` that nothing sleeps
for), which ``labctl check`` reports.
"""

from __future__ import annotations

import ast
import math
import string
from collections.abc import Iterable, Mapping
from typing import Any

from labctl.ioc.config.procedures import ParamConfig, ProcedureConfig, Step
from labctl.ioc.expr import Expression, ExpressionError


class ParameterError(ValueError):
    """A submitted parameter is missing, unknown, or of the wrong type."""


def is_expression(value: Any) -> bool:
    """Whether a step value is an expression (a string starting with ``=``)."""
    return isinstance(value, str) and value.startswith("=")


def compile_value(value: Any, variables: Iterable[str]) -> Expression | Any:
    """An Expression for ``=...`` strings, else the literal itself."""
    if is_expression(value):
        return Expression(value[1:], list(variables))
    return value


def evaluate(value: Any, env: Mapping[str, Any]) -> Any:
    """A step value for the given variables."""
    if isinstance(value, Expression):
        return value.evaluate(env)
    return value


def _placeholders(text: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(text) if name]


def check_procedure(name: str, proc: ProcedureConfig, pv_names: set[str]) -> list[tuple[tuple[Any, ...], str]]:
    """Problems in a procedure as (key path, message): unknown PVs, bad expressions, placeholders."""
    problems: list[tuple[tuple[Any, ...], str]] = []
    base = ("procedures", name)
    for pname, p in proc.params.items():
        if p.default is not None:
            try:
                convert_param(pname, p, p.default)
            except ParameterError as e:
                problems.append((base + ("params", pname, "default"), str(e)))

    def walk(steps: tuple[Step, ...], variables: set[str], path: tuple[Any, ...]) -> None:
        for i, step in enumerate(steps):
            sp = path + (i, step.kind)
            kind = step.kind
            try:
                if kind in ("set", "ramp"):
                    s = step.set or step.ramp
                    assert s is not None
                    if s.pv not in pv_names:
                        problems.append((sp + ("pv",), f"unknown PV {s.pv!r}"))
                    compile_value(s.value if kind == "set" else s.to, variables)  # type: ignore[union-attr]
                elif kind == "wait":
                    w = step.wait
                    assert w is not None
                    for var, pv in w.inputs.items():
                        if pv not in pv_names:
                            problems.append((sp + ("inputs", var), f"unknown PV {pv!r}"))
                    Expression(w.until, [*variables, *w.inputs])
                elif kind == "read":
                    r = step.read
                    assert r is not None
                    for pv in r.pvs:
                        if pv not in pv_names:
                            problems.append((sp + ("pvs",), f"unknown PV {pv!r}"))
                    for ph in _placeholders(r.label):
                        if ph not in variables:
                            problems.append((sp + ("label",), f"unknown placeholder {{{ph}}}"))
                elif kind == "sleep":
                    compile_value(step.sleep, variables)
                elif kind == "log":
                    for ph in _placeholders(step.log or ""):
                        if ph not in variables:
                            problems.append((sp, f"unknown placeholder {{{ph}}}"))
                elif kind == "repeat":
                    r = step.repeat
                    assert r is not None
                    compile_value(r.values, variables)
                    walk(r.steps, variables | {r.var}, sp + ("steps",))
            except ExpressionError as e:
                problems.append((sp, f"expression: {e}"))

    walk(proc.steps, set(proc.params), base + ("steps",))
    walk(proc.cleanup, set(proc.params), base + ("cleanup",))
    return problems


def _expression_names(value: Any) -> set[str]:
    if not is_expression(value):
        return set()
    try:
        tree = ast.parse(value[1:].strip(), mode="eval")
    except SyntaxError:
        return set()  # check_procedure reports it
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}


def used_names(steps: Iterable[Step]) -> set[str]:
    """Every variable the steps' expressions, labels and log lines use (repeat variables included)."""
    out: set[str] = set()
    for step in steps:
        if step.set is not None:
            out |= _expression_names(step.set.value)
        elif step.ramp is not None:
            out |= _expression_names(step.ramp.to)
        elif step.wait is not None:
            out |= _expression_names("=" + step.wait.until) - set(step.wait.inputs)
        elif step.read is not None:
            out |= set(_placeholders(step.read.label))
        elif step.sleep is not None:
            out |= _expression_names(step.sleep)
        elif step.log is not None:
            out |= set(_placeholders(step.log))
        elif step.repeat is not None:
            out |= _expression_names(step.repeat.values) | used_names(step.repeat.steps)
    return out


def unused_params(proc: ProcedureConfig) -> list[str]:
    """The procedure's parameters that none of its steps or cleanup steps uses, in declaration order.

    A parameter nobody reads is a promise the procedure does not keep (``settle_s`` offered
    to the submitter while every step sleeps 0); ``labctl check`` reports each one.
    """
    used = used_names((*proc.steps, *proc.cleanup))
    return [name for name in proc.params if name not in used]


#: Largest magnitude of an ``int`` parameter (64-bit signed), and the longest text a number may be written in.
INT_LIMIT = 2**63 - 1
MAX_NUMBER_TEXT = 64


def convert_param(name: str, p: ParamConfig, value: Any) -> Any:
    """A submitted value converted to the parameter's type (strings from a command line parse).

    Bounded before anything uses it: numbers finite unless the parameter ``allow_nonfinite``,
    ints within 64 bits, a ``float64[]`` a flat list of at most ``max_items`` numbers, a
    string at most ``max_length`` characters, then ``min``/``max``. Anything else raises
    :class:`ParameterError` saying what was expected (never OverflowError or RecursionError).
    """
    t = p.type
    try:
        if t == "float64":
            v: Any = _number(value, p)
        elif t == "int":
            v = _integer(value)
        elif t == "bool":
            v = _boolean(value)
        elif t == "string":
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                raise ValueError(f"a string, not {type(value).__name__}")
            v = str(value)
            if len(v) > p.max_length:
                raise ValueError(f"at most {p.max_length} characters, got {len(v)}")
        else:
            if isinstance(value, str):
                if len(value) > p.max_items * MAX_NUMBER_TEXT:
                    raise ValueError(f"at most {p.max_items} numbers")
                items: list[Any] = [x.strip() for x in value.split(",")] if value.strip() else []
            elif isinstance(value, (list, tuple)):
                items = list(value)
            else:
                raise ValueError(f"a list of numbers, not {type(value).__name__}")
            if len(items) > p.max_items:
                raise ValueError(f"at most {p.max_items} numbers, got {len(items)}")
            v = [_number(x, p) for x in items]
    except (TypeError, ValueError, OverflowError) as e:
        raise ParameterError(f"parameter {name!r}: expected {t}, got {_shown(value)} ({e})") from None
    for x in v if isinstance(v, list) else [v]:
        if isinstance(x, (int, float)) and not isinstance(x, bool):
            if p.min is not None and x < p.min:
                raise ParameterError(f"parameter {name!r}: {x} is below its minimum {p.min}")
            if p.max is not None and x > p.max:
                raise ParameterError(f"parameter {name!r}: {x} is above its maximum {p.max}")
    return v


def _number(value: Any, p: ParamConfig) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"a number, not {type(value).__name__}")
    if isinstance(value, str) and len(value) > MAX_NUMBER_TEXT:
        raise ValueError(f"a number written in at most {MAX_NUMBER_TEXT} characters")
    v = float(value)  # OverflowError for an int beyond float's range
    if not p.allow_nonfinite and not math.isfinite(v):
        raise ValueError("not finite")
    return v


def _integer(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"an integer, not {type(value).__name__}")
    if isinstance(value, str):
        if len(value) > MAX_NUMBER_TEXT:
            raise ValueError(f"an integer written in at most {MAX_NUMBER_TEXT} characters")
        v = int(value)
    elif isinstance(value, float):
        if not value.is_integer():  # also NaN and infinities
            raise ValueError("not an integer")
        v = int(value)
    else:
        v = value
    if abs(v) > INT_LIMIT:
        raise ValueError("beyond 64 bits")
    return v


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
        return value.lower() in ("true", "1")
    raise ValueError("true or false")


def _shown(value: Any) -> str:
    """A submitted value for a message: short, whatever its size."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10**15:
        return f"an integer of {len(str(abs(value))) if abs(value) < 10**4000 else 'more than 4000'} digits"
    try:
        text = repr(value)
    except (RecursionError, ValueError):
        return f"a {type(value).__name__} too deeply nested or too large to show"
    return text if len(text) <= 80 else f"{text[:60]}... ({len(text)} characters)"


def bind_params(proc_name: str, proc: ProcedureConfig, given: Mapping[str, Any]) -> dict[str, Any]:
    """The full parameter set for a job: given values converted, defaults filled, unknowns refused."""
    unknown = sorted(set(given) - set(proc.params))
    if unknown:
        raise ParameterError(f"procedure {proc_name!r} has no parameter {unknown[0]!r}; it takes {sorted(proc.params)}")
    out: dict[str, Any] = {}
    for name, p in proc.params.items():
        if name in given:
            out[name] = convert_param(name, p, given[name])
        elif p.default is not None:
            out[name] = convert_param(name, p, p.default)
        else:
            raise ParameterError(f"procedure {proc_name!r} needs parameter {name!r} ({p.type})")
    return out


def procedure_warnings(procedures: Mapping[str, ProcedureConfig]) -> list[str]:
    """``labctl check``'s warnings about procedures: ``procedures.<name>.params.<param>: ...`` per unused parameter."""
    return [
        f"procedures.{name}.params.{param}: parameter {param!r} is used by no step (the submitter's value would be ignored)"
        for name, proc in procedures.items()
        for param in unused_params(proc)
    ]
