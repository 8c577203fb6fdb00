"""The typed base every params section derives from: unknown keys and wrong types fail fast."""

from __future__ import annotations

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


def _describe(err: dict, prefix: str) -> str:
    loc = ".".join(str(p) for p in (prefix, *err["loc"]) if p != "")
    kind = err["type"]
    value = err.get("input")
    if kind == "extra_forbidden":
        return f"{loc}: unknown key (typo?); remove it or check the spelling against params.yaml"
    msg = f"{loc}: {err['msg']} (got {value!r})"
    if isinstance(value, str) and _looks_like_number(value):
        msg += "; YAML reads exponent floats without a dot as strings: write e.g. 2.0e-5, not 2e-5"
    return msg


def _looks_like_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def format_validation_error(
    err: ValidationError, prefix: str = "", source: str = "params.yaml"
) -> ParamsError:
    """Turn a pydantic error into one ParamsError listing every bad key on its own line."""
    lines = [_describe(e, prefix) for e in err.errors()]
    return ParamsError(f"{source}: invalid parameters:\n  " + "\n  ".join(lines))
