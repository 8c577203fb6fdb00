"""The typed base every params section derives from: unknown keys and wrong types fail fast."""

from __future__ import annotations

import re
from collections.abc import Callable

from pydantic import BaseModel, ConfigDict, ValidationError


class ParamsError(ValueError):
    """params.yaml is invalid; the message names each bad key and what is allowed."""


class Section(BaseModel):
    """A params.yaml section.

    strict=True: YAML 1.1 reads `2e-5` as the *string* "2e-5"; a lax schema would quietly coerce it,
    hiding that other tools (dvc exp show, a plain yaml.safe_load) see a string. We refuse it instead.
    extra="forbid": a typo such as `learning_rat` is an error, not a silently ignored key.
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, validate_default=True)


# A decimal number as text; group "exp" is set when it has an exponent. PyYAML (YAML 1.1) resolves a
# float only with a dot and a signed exponent, so `2e-5` and `1.0e5` arrive as strings.
_NUMBER = re.compile(r"[-+]?(?:\d[\d_]*\.?\d*|\.\d+)(?P<exp>[eE][-+]?\d+)?")
_BOOL_WORDS = {"true", "false", "yes", "no", "on", "off", "y", "n"}

LineOf = Callable[[tuple], "int | None"]


def _expects(kind: str, *prefixes: str) -> bool:
    return kind.startswith(prefixes)


def value_hint(kind: str, value: object) -> str:
    """A hint that fits the value the schema refused (pydantic error type `kind`), or "" if none does.

    Only YAML's own surprises get a hint: an exponent float read as a string, a quoted number or
    boolean, a bare yes/no read as a boolean, a number where text belongs.
    """
    if isinstance(value, str) and _expects(kind, "int", "float", "decimal"):
        number = _NUMBER.fullmatch(value.strip())
        if number and number["exp"]:
            return (
                "YAML 1.1 reads an exponent float as a string unless it has a dot and a signed exponent: "
                "write e.g. 2.0e-5 or 1.0e+3, not 2e-5 or 1.0e3"
            )
        if number:
            return "a quoted number is a string: remove the quotes"
    if isinstance(value, str) and _expects(kind, "bool") and value.strip().lower() in _BOOL_WORDS:
        return "a quoted boolean is a string: write true or false without quotes"
    if isinstance(value, float) and _expects(kind, "int") and value.is_integer():
        return f"write a whole number without a decimal point: {int(value)}"
    if isinstance(value, bool) and _expects(kind, "string", "literal"):
        return "YAML reads a bare yes/no/on/off/true/false as a boolean: quote it to keep it as text"
    if isinstance(value, int | float) and _expects(kind, "string"):
        return "YAML reads it as a number: quote it to keep it as text"
    return ""


def _describe(err: dict, prefix: str, line_of: LineOf | None) -> str:
    path = tuple(p for p in (prefix, *err["loc"]) if p != "")
    loc = ".".join(str(p) for p in path) or "(top level)"
    line = line_of(path) if line_of else None
    where = f"line {line}: " if line else ""
    if err["type"] == "extra_forbidden":
        return f"{where}{loc}: unknown key (typo?); remove it or check the spelling against params.yaml"
    value = err.get("input")
    msg = f"{where}{loc}: {err['msg']} (got {value!r})"
    hint = value_hint(err["type"], value)
    return f"{msg}; {hint}" if hint else msg


def describe_errors(err: ValidationError, prefix: str = "", line_of: LineOf | None = None) -> list[str]:
    """One line per bad key of a pydantic error: `line N: dotted.key: what is wrong (got ...); hint`."""
    return [_describe(e, prefix, line_of) for e in err.errors()]


def params_error(source: str, lines: list[str]) -> ParamsError:
    """One ParamsError listing every bad key of `source` on its own line."""
    return ParamsError(f"{source}: invalid parameters:\n  " + "\n  ".join(lines))


def format_validation_error(
    err: ValidationError, prefix: str = "", source: str = "params.yaml", line_of: LineOf | None = None
) -> ParamsError:
    """Turn a pydantic error into one ParamsError listing every bad key on its own line."""
    return params_error(source, describe_errors(err, prefix, line_of))
