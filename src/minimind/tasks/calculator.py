"""The calculator tool: arithmetic from model output, evaluated by walking a whitelisted AST.

Never ``eval``: the expression is parsed with :mod:`ast` and only numbers, ``+ - * / // % **``,
unary signs, parentheses, ``sqrt``/``abs``/``round`` and the constants ``pi``/``e`` are evaluated.
Every bound an expression bomb needs to break is checked: input length, node count, nesting depth,
exponent size, the magnitude of every literal, intermediate and result, and a wall-time guard.
:class:`ToolError` lives here because the calculator is the lowest layer of the tools; every tool
raises it for input it refuses.
"""

from __future__ import annotations

import ast
import math
import operator
import time
from collections.abc import Callable
from typing import Any


class ToolError(ValueError):
    """A tool refused its input; the message is meant to be shown to the model as the result."""


def format_number(value: float) -> str:
    """Render a number the way the tasks write answers: integers without ``.0``, else ≤4 decimals."""
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value):
        return str(value)
    rounded = round(float(value), 4)
    if rounded == int(rounded):
        return str(int(rounded))
    return f"{rounded:.4f}".rstrip("0").rstrip(".")


MAX_EXPRESSION_CHARS = 200  # longer input is refused before parsing
MAX_NODES = 150  # expression nodes (numbers, operators, calls) in the parsed tree
MAX_DEPTH = 100  # nesting of operators: -(-(...)), and left-to-right chains like 1+2+...+n
MAX_EXPONENT = 100  # |b| in a ** b
MAX_MAGNITUDE = 10**100  # |x| of every literal, intermediate and result
MAX_SECONDS = 0.5  # wall-time guard; the bounds above already keep evaluation far below it
MAX_ROUND_DIGITS = 15

_BINOPS: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type[ast.unaryop], Callable[[Any], Any]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_CONSTANTS: dict[str, float] = {"pi": math.pi, "e": math.e}
_FUNCTION_ARITY: dict[str, tuple[int, int]] = {"sqrt": (1, 1), "abs": (1, 1), "round": (1, 2)}
# Symbols a model (or a Chinese prompt) writes for arithmetic; ``^`` means power to a person.
_NORMALISE = str.maketrans({"×": "*", "÷": "/", "−": "-", "（": "(", "）": ")"})


def _checked(value: Any) -> int | float:
    """Refuse results that are not real, not finite or too large, so no step can blow up."""
    if isinstance(value, complex):
        raise ToolError("the result is not a real number")
    if isinstance(value, float) and not math.isfinite(value):
        raise ToolError("the result is too large")
    if abs(value) > MAX_MAGNITUDE:
        raise ToolError(f"numbers are limited to {MAX_MAGNITUDE:.0e} in magnitude")
    return value


def _power(base: float, exponent: float) -> int | float:
    """``base ** exponent`` after checking, *without computing it*, that the result stays bounded."""
    if abs(exponent) > MAX_EXPONENT:
        raise ToolError(f"exponent too large (|exponent| must be at most {MAX_EXPONENT})")
    if base == 0 and exponent < 0:
        raise ToolError("division by zero (zero to a negative power)")
    if base != 0 and exponent > 0 and math.log10(abs(base)) * exponent > 100:
        raise ToolError(f"numbers are limited to {MAX_MAGNITUDE:.0e} in magnitude")
    if base < 0 and not float(exponent).is_integer():
        raise ToolError("the result is not a real number (fractional power of a negative number)")
    return _checked(base**exponent)


def _call_function(name: str, args: list[int | float]) -> int | float:
    if name == "sqrt":
        if args[0] < 0:
            raise ToolError("sqrt of a negative number")
        return _checked(math.sqrt(args[0]))
    if name == "abs":
        return _checked(abs(args[0]))
    if len(args) == 2:  # round(x, ndigits)
        digits = args[1]
        if not isinstance(digits, int) or not 0 <= digits <= MAX_ROUND_DIGITS:
            raise ToolError(f"round's digits must be an integer from 0 to {MAX_ROUND_DIGITS}")
        return _checked(round(args[0], digits))
    return _checked(round(args[0]))


def safe_calculate(expression: str) -> int | float:
    """Evaluate an arithmetic expression without ever running code; raise :class:`ToolError`.

    Accepted: int/float literals, ``+ - * / // % **`` (``^`` is read as ``**``, ``×``/``÷`` as
    ``*``/``/``), unary ``+``/``-``, parentheses, the constants ``pi`` and ``e`` and the functions
    ``sqrt``, ``abs`` and ``round``. Everything else a Python expression could hold (names,
    attributes, subscripts, strings, lambdas, comprehensions, other calls) is refused by the
    whitelist walk. Length, node count, nesting depth, exponents and every intermediate value
    are bounded, so an adversarial expression is refused rather than hanging or exhausting
    memory.
    """
    if not isinstance(expression, str):
        raise ToolError("the expression must be a string")
    text = expression.translate(_NORMALISE).replace("^", "**").strip()
    if not text:
        raise ToolError("empty expression")
    if len(text) > MAX_EXPRESSION_CHARS:
        raise ToolError(f"expression too long (at most {MAX_EXPRESSION_CHARS} characters)")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        raise ToolError(f"not an arithmetic expression: {expression!r}") from exc
    if sum(isinstance(node, ast.expr) for node in ast.walk(tree)) > MAX_NODES:
        raise ToolError(f"expression too complex (at most {MAX_NODES} numbers and operators)")
    deadline = time.monotonic() + MAX_SECONDS

    def ev(node: ast.expr, depth: int) -> int | float:
        if depth > MAX_DEPTH:
            raise ToolError(f"expression nested too deeply (at most {MAX_DEPTH} levels)")
        if time.monotonic() > deadline:
            raise ToolError("expression took too long to evaluate")
        if isinstance(node, ast.Constant):
            if type(node.value) not in (int, float):  # bool, str, bytes, complex, None, ...
                raise ToolError(f"only numbers are allowed, not {node.value!r}")
            return _checked(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            left, right = ev(node.left, depth + 1), ev(node.right, depth + 1)
            if isinstance(node.op, ast.Pow):
                return _power(left, right)
            return _checked(_BINOPS[type(node.op)](left, right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _checked(_UNARY[type(node.op)](ev(node.operand, depth + 1)))
        if isinstance(node, ast.Name):
            if node.id in _CONSTANTS:
                return _CONSTANTS[node.id]
            raise ToolError(f"unknown name {node.id!r} (only numbers, pi and e are allowed)")
        if isinstance(node, ast.Call):
            func = node.func.id if isinstance(node.func, ast.Name) else None
            if func not in _FUNCTION_ARITY or node.keywords:
                raise ToolError(f"only the functions {', '.join(_FUNCTION_ARITY)} can be called")
            lo, hi = _FUNCTION_ARITY[func]
            if not lo <= len(node.args) <= hi or any(isinstance(a, ast.Starred) for a in node.args):
                raise ToolError(f"{func} takes {lo if lo == hi else f'{lo} or {hi}'} argument(s)")
            return _call_function(func, [ev(a, depth + 1) for a in node.args])
        raise ToolError(f"unsupported syntax ({type(node).__name__}) in {expression!r}")

    try:
        return ev(tree.body, 0)
    except ZeroDivisionError as exc:
        raise ToolError("division by zero") from exc
    except (OverflowError, MemoryError, RecursionError) as exc:
        raise ToolError("the result is too large") from exc


def calculate_math(expression: str) -> dict[str, Any]:
    """``{"result": "<number>"}``, the number rendered by :func:`format_number` (as in the demo data)."""
    return {"result": format_number(safe_calculate(expression))}
