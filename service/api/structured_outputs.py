"""Structured outputs on the way in: OpenAI's `response_format` and vLLM's `structured_outputs`
extension, checked as vLLM checks them, to the engine's Constraint.

- response_format: `text` (free), `json_object` (any JSON object), `json_schema` (its `schema`;
  `strict` or not, the answer always follows the schema, as on vLLM). vLLM's structural tags are
  refused by name (this server does not implement them).
- structured_outputs: exactly one of `json` (a schema, object or JSON text), `regex`, `choice`,
  `grammar` (GBNF/EBNF `root ::= ...` or Lark), `json_object`; `disable_any_whitespace` (compact
  JSON), `whitespace_pattern`. response_format, when it asks for JSON, takes the place of these
  (vLLM's rule), so a request with both kinds is refused.
"""
from __future__ import annotations

import json
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from service.engine.structured import Constraint, schema_json
from service.errors import InvalidRequest

_KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    name: str
    description: Optional[str] = None
    json_schema: Optional[dict[str, Any]] = Field(None, alias="schema")
    strict: Optional[bool] = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["text", "json_object", "json_schema", "structural_tag"]
    json_schema: Optional[JsonSchemaFormat] = None


class StructuredOutputs(BaseModel):
    """vLLM's StructuredOutputsParams, field for field."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    json_: Union[str, dict, None] = Field(None, alias="json")
    regex: Optional[str] = None
    choice: Optional[list[str]] = None
    grammar: Optional[str] = None
    json_object: Optional[bool] = None
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False  # objects are closed anyway (vLLM's default backend does so)
    whitespace_pattern: Optional[str] = None
    structural_tag: Optional[str] = None


def check_response_format(data: Any) -> Any:
    """vLLM's check on the raw request: a json_schema response format must carry its json_schema."""
    if isinstance(data, dict):
        response_format = data.get("response_format")
        if isinstance(response_format, dict) and response_format.get("type") == "json_schema" \
                and response_format.get("json_schema") is None:
            raise InvalidRequest("When response_format type is 'json_schema', the 'json_schema' field must be "
                                 "provided.", param="response_format")
    return data


def structured_constraint(response_format: Optional[ResponseFormat],
                          structured: Optional[StructuredOutputs]) -> Constraint | None:
    """The constraint these fields ask for (None: free text); InvalidRequest as vLLM refuses them."""
    asked: dict[str, Any] = {}
    source: dict[str, str] = {}
    if structured is not None:
        for kind in _KINDS:
            asked[kind] = getattr(structured, "json_" if kind == "json" else kind)
            source[kind] = f"structured_outputs.{kind}"
    wants_json = response_format is not None and response_format.type != "text"
    if wants_json:
        if response_format.type == "structural_tag":
            raise InvalidRequest("response_format type 'structural_tag' is not supported by this server.",
                                 param="response_format", kind="unsupported")
        kind = "json_object" if response_format.type == "json_object" else "json"
        # Replaces the field (vLLM's rule): a json_schema without its schema leaves it empty.
        asked[kind] = True if kind == "json_object" else response_format.json_schema.json_schema
        source[kind] = "response_format"
    if structured is None and not wants_json:
        return None
    asked = {kind: value for kind, value in asked.items() if value is not None}
    if len(asked) != 1:
        which = "multiple are specified" if asked else "none are specified"
        raise InvalidRequest(f"You can only use one kind of structured outputs constraint but {which}: "
                             f"{sorted(asked) or 'none'}.", param="structured_outputs")
    (kind, value), = asked.items()
    where = source[kind]
    if kind == "structural_tag":
        raise InvalidRequest("structured_outputs.structural_tag is not supported by this server.", param=where,
                             kind="unsupported")
    if kind == "choice" and not value:
        raise InvalidRequest(f"Choice '{value}' cannot be an empty list", param=where)
    if kind in ("grammar", "json") and isinstance(value, str) and not value.strip():
        raise InvalidRequest(f"{where} cannot be an empty string", param=where)
    if kind == "json_object" and value is False:
        raise InvalidRequest("structured_outputs.json_object must be True if set; omit structured_outputs to "
                             "disable structured outputs", param=where)
    options = {"compact": bool(structured and structured.disable_any_whitespace),
               "whitespace_pattern": structured.whitespace_pattern if structured else None}
    if kind == "json":
        text = value if isinstance(value, str) else schema_json(value, where)
        return Constraint("json", text, source=where, **options)
    if kind == "json_object":
        return Constraint("json_object", source=where, **options)
    if kind == "choice":
        return Constraint("choice", json.dumps(value), source=where)
    return Constraint(kind, value, source=where)
