"""Validate custom resources against the structural OpenAPI v3 schema in a CRD, the way
the API server prunes and checks them: unknown fields are errors (strict), types, enums,
patterns, ranges and required fields are checked. CEL rules (x-kubernetes-validations)
are not evaluated here."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import yaml


def load_crd(path: Path) -> dict[str, Any]:
    """The CustomResourceDefinition object in `path`."""
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    crds = [d for d in docs if d.get("kind") == "CustomResourceDefinition"]
    assert len(crds) == 1, f"{path}: expected one CustomResourceDefinition, found {len(crds)}"
    return crds[0]


def version_schema(crd: dict[str, Any], version: str) -> dict[str, Any]:
    """openAPIV3Schema of one served version."""
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            return v["schema"]["openAPIV3Schema"]
    raise KeyError(f"CRD {crd['metadata']['name']} has no version {version}")


def _strict(schema: Any) -> Any:
    """Copy of a structural schema with unknown fields rejected wherever the API server
    would prune them (objects with `properties` and no preserve-unknown-fields)."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()
           if not k.startswith("x-kubernetes-") and k != "nullable"}
    if schema.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if (schema.get("type") == "object" and "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    return out


def validate_custom_resource(obj: dict[str, Any], crd: dict[str, Any]) -> None:
    """Raise jsonschema.ValidationError if `obj` does not fit the CRD's schema."""
    group = crd["spec"]["group"]
    api_group, _, version = obj["apiVersion"].partition("/")
    assert api_group == group, f"{obj['apiVersion']} is not in group {group}"
    assert obj["kind"] == crd["spec"]["names"]["kind"]
    schema = _strict(copy.deepcopy(version_schema(crd, version)))
    # metadata is validated by the API server's ObjectMeta handling, not the CRD schema.
    schema.setdefault("properties", {})["metadata"] = {"type": "object"}
    schema["properties"].setdefault("apiVersion", {"type": "string"})
    schema["properties"].setdefault("kind", {"type": "string"})
    jsonschema.Draft7Validator(schema).validate(obj)
