"""Query strings and headers, read strictly: what /openapi.json declares, and nothing else.

A query parameter the operation does not declare is a 422 naming it (a mistyped ``after_seq``
would otherwise replay a job from its start in silence), one given twice is a 422 (quart-schema
hands the model a list, which no declared field takes), and an integer is decimal digits:
``5.0``, ``+5``, `` 5`` and ``5_0`` are refused rather than read as 5, so the server accepts
exactly the values its schema describes.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Final

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema

DIGITS: Final = re.compile(r"[0-9]+")
"""A whole number as a query string or header carries it."""


def _decimal(value: Any) -> Any:
    if isinstance(value, str) and not DIGITS.fullmatch(value):
        raise ValueError("must be a whole number written in decimal digits")
    return value


QueryInt = Annotated[int, BeforeValidator(_decimal)]
"""An integer query parameter: decimal digits only (pydantic alone would take ``5.0``)."""

QueryStr = Annotated[str | None, WithJsonSchema({"type": "string"})]
"""An optional string parameter. Absent is None, but the schema says string: a query string
cannot carry a null, and ``anyOf [string, null]`` only misleads clients and fuzzers."""


def _no_null_defaults(schema: dict[str, Any]) -> None:
    """An absent parameter is no parameter: drop ``"default": null`` from string parameters."""
    for prop in schema.get("properties", {}).values():
        if prop.get("default", 0) is None:
            del prop["default"]


class QueryModel(BaseModel):
    """A query string's parameters; any other parameter is refused.

    ``user_id`` is taken everywhere and ignored, as the contract has it: the caller's identity
    comes from the token alone, and a client written for an API that filtered by it keeps
    working (seeing only its own jobs).
    """

    model_config = ConfigDict(extra="forbid", json_schema_extra=_no_null_defaults)

    user_id: QueryStr = Field(
        None, deprecated=True, description="ignored: the caller's identity comes from the token"
    )
