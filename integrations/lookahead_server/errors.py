"""OpenAI-style errors: ``{"error": {"message", "type", "param", "code"}}`` for every failure, never FastAPI's 422.

Also the request-body reader: size limit, strict UTF-8, strict JSON (no NaN/Infinity), then a pydantic model, each
failure turned into a 4xx whose message says what was wrong and what is allowed.
"""

from __future__ import annotations

import json
import logging
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from .schemas import EXPECTED, NESTED, all_field_names, field_names

log = logging.getLogger("lookahead_server")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "invalid_request_error", 405: "invalid_request_error", 413: "invalid_request_error",
          429: "rate_limit_error"}
_FIELDS = all_field_names()

M = TypeVar("M", bound=BaseModel)


class ApiError(Exception):
    """An error answered as OpenAI-style JSON with ``status``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        kind = _TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def _param(loc: tuple[Any, ...]) -> list[str | int]:
    """The field path of a pydantic error location, without union branch tags (``str``, ``list[str]`` ...)."""
    return [p for p in loc if isinstance(p, int) or p in _FIELDS]


def _container(model: type[BaseModel], path: list[str | int]) -> type[BaseModel]:
    """The model that holds the last element of ``path``."""
    holder = model
    for p in path[:-1]:
        if isinstance(p, str) and p in NESTED:
            holder = NESTED[p]
    return holder


def describe_validation_error(model: type[BaseModel], errors: list[dict[str, Any]]) -> ApiError:
    """One clear 400 from pydantic's errors (the first one; union branches of the same field count once)."""
    error = errors[0]
    if error.get("type") == "missing":  # a misspelt name shows as missing + unknown: the unknown one explains it
        error = next((e for e in errors if e.get("type") == "extra_forbidden"), error)
    path = _param(tuple(p for p in error.get("loc", ()) if p != "body"))
    param = ".".join(str(p) for p in path) or None
    kind = error.get("type", "")
    msg = str(error.get("msg", "invalid value"))
    field = next((p for p in reversed(path) if isinstance(p, str)), None)
    if kind == "extra_forbidden":
        raw = error.get("loc", ())
        name = raw[-1] if raw else param
        allowed = ", ".join(field_names(_container(model, path + [str(name)])))
        full = ".".join(str(p) for p in path + [str(name)]) if name not in path else param
        return ApiError(400, f"unknown field '{full}'; allowed fields here: {allowed}", param=full)
    if kind == "missing":
        hint = f" ({EXPECTED[field]})" if field in EXPECTED else ""
        return ApiError(400, f"missing required field '{param}'{hint}", param=param)
    if kind in ("model_type", "dict_type") and not path:
        allowed = ", ".join(field_names(model))
        return ApiError(400, f"the request body must be a JSON object with the fields: {allowed}")
    if kind == "value_error":
        msg = msg.removeprefix("Value error, ")
        return ApiError(400, msg if param is None else f"invalid '{param}': {msg}", param=param)
    hint = f"; expected {EXPECTED[field]}" if field in EXPECTED else ""
    where = f"invalid '{param}'" if param else "invalid request body"
    got = error.get("input")
    shown = json.dumps(got)[:80] if isinstance(got, (str, int, float, bool, type(None))) else type(got).__name__
    return ApiError(400, f"{where}: {msg} (got {shown}){hint}", param=param)


def validate_body(model: type[M], data: Any) -> M:
    """``model.model_validate(data)`` or an :class:`ApiError` 400 saying what was wrong."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise describe_validation_error(model, e.errors(include_url=False)) from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_json(raw: bytes) -> Any:
    """Strict UTF-8 JSON (a UTF-8 BOM is tolerated), or an :class:`ApiError` 400."""
    if not raw.strip():
        raise ApiError(400, "the request body is empty: send a JSON object")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"the request body is not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                            f"send JSON encoded as UTF-8") from None
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise ApiError(400, f"the request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
                       ) from None
    except ValueError as e:  # NaN / Infinity
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise ApiError(400, "the request body is not valid JSON: nested too deeply") from None
    bad = _invalid_text(data, "")
    if bad is not None:
        where, char = bad
        raise ApiError(400, f"the request body holds text that is not valid Unicode at {where or 'the top level'}: "
                            f"a lone surrogate \\u{ord(char):04x} (a \\ud800-\\udfff escape not part of a "
                            f"pair); send valid text", param=where or None)
    return data


def _invalid_text(value: Any, where: str) -> tuple[str, str] | None:
    """(path, character) of the first string (or key) in parsed JSON holding a lone surrogate, or None."""
    stack = [(value, where)]
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as exc:
                return path, item[exc.start]
        elif isinstance(item, dict):
            for key, child in reversed(list(item.items())):
                name = f"{path}.{key}" if path else str(key)
                try:
                    key.encode("utf-8")
                except UnicodeEncodeError as exc:
                    return (path or "a key"), key[exc.start]
                stack.append((child, name))
        elif isinstance(item, list):
            stack.extend((child, f"{path}[{i}]") for i, child in reversed(list(enumerate(item))))
    return None
