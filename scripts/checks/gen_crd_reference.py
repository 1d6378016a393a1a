#!/usr/bin/env python3
"""Generate docs/crd-reference.md from the generated CRD YAML in crds/.

Usage:
  .venv/bin/python scripts/checks/gen_crd_reference.py           # write the file
  .venv/bin/python scripts/checks/gen_crd_reference.py --check   # exit 1 when it is stale

Every field gets its path, type, default, validation (enum, pattern, ranges, lengths,
required, CEL rules) and description. Large Kubernetes types embedded in the spec (affinity,
tolerations...) are summarised in one row instead of hundreds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Iterator

import yaml

ROOT = Path(__file__).resolve().parents[2]
CRDS = ROOT / "crds"
OUTPUT = ROOT / "docs" / "crd-reference.md"
# An object subtree with more fields than this, at least this deep (spec.pod.affinity), is
# an embedded Kubernetes type: one row.
COLLAPSE_ABOVE = 40
COLLAPSE_DEPTH = 3


def _count(schema: dict[str, Any]) -> int:
    """Number of property nodes under a schema node."""
    total = 0
    for sub in (schema.get("properties") or {}).values():
        total += 1 + _count(sub)
    if isinstance(schema.get("items"), dict):
        total += _count(schema["items"])
    if isinstance(schema.get("additionalProperties"), dict):
        total += _count(schema["additionalProperties"])
    return total


def type_of(schema: dict[str, Any]) -> str:
    """Human-readable type of a schema node."""
    if schema.get("x-kubernetes-int-or-string"):
        return "int-or-string"
    kind = schema.get("type")
    if kind == "array":
        return f"[]{type_of(schema.get('items') or {})}"
    if kind == "object":
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict) and not schema.get("properties"):
            return f"map[string]{type_of(extra)}"
        if schema.get("x-kubernetes-preserve-unknown-fields") and not schema.get("properties"):
            return "object (free-form)"
        return "object"
    if kind in ("integer", "number") and schema.get("format"):
        return f"{kind} ({schema['format']})"
    if kind is None and schema.get("x-kubernetes-preserve-unknown-fields"):
        return "any"
    return str(kind or "any")


def _num(value: Any) -> Any:
    """1.0 -> 1 (schemars writes integer bounds as floats)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _fmt(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return "`" + yaml.safe_dump(value, default_flow_style=True, width=10_000).strip() + "`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{value}`"


def validation_of(schema: dict[str, Any], required: bool) -> list[str]:
    """Validation constraints of a node, one string each."""
    out: list[str] = []
    if required:
        out.append("required")
    if "enum" in schema:
        out.append("one of " + ", ".join(_fmt(v) for v in schema["enum"]))
    if "pattern" in schema:
        out.append(f"pattern `{schema['pattern']}`")
    for key, label in (("minimum", ">="), ("maximum", "<=")):
        if key in schema:
            exclusive = schema.get(f"exclusive{key[:1].upper()}{key[1:]}")
            out.append(f"{label.rstrip('=') if exclusive else label} {_num(schema[key])}")
    for key, label in (("minLength", "min length"), ("maxLength", "max length"),
                       ("minItems", "min items"), ("maxItems", "max items"),
                       ("minProperties", "min properties"), ("maxProperties", "max properties")):
        if key in schema:
            out.append(f"{label} {schema[key]}")
    if schema.get("x-kubernetes-list-type"):
        out.append(f"list type {schema['x-kubernetes-list-type']}")
    for rule in schema.get("x-kubernetes-validations") or []:
        text = f"rule `{rule['rule']}`"
        if rule.get("message"):
            text += f": {rule['message']}"
        out.append(text)
    return out


def _cell(text: str) -> str:
    """Markdown table cell: no pipes or newlines."""
    return " ".join(text.replace("|", "\\|").split())


Row = tuple[str, str, str, str, str]


def rows(schema: dict[str, Any], path: str, required: bool = False) -> Iterator[Row]:
    """Table rows for a node and (unless collapsed) its descendants, depth first."""
    depth = len(path.replace("[]", "").split("."))
    collapsed = depth >= COLLAPSE_DEPTH and _count(schema) > COLLAPSE_ABOVE
    description = schema.get("description", "")
    if collapsed:
        description += " (Kubernetes type; its fields are documented by `kubectl explain`.)"
    default = _fmt(schema["default"]) if "default" in schema else ""
    yield (path, type_of(schema), default, "; ".join(validation_of(schema, required)), description)
    if collapsed:
        return
    needed = set(schema.get("required") or [])
    for name, sub in (schema.get("properties") or {}).items():
        yield from rows(sub, f"{path}.{name}", name in needed)
    items = schema.get("items")
    if isinstance(items, dict) and (items.get("properties") or items.get("x-kubernetes-validations")):
        needed_items = set(items.get("required") or [])
        for name, sub in (items.get("properties") or {}).items():
            yield from rows(sub, f"{path}[].{name}", name in needed_items)
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict) and extra.get("properties"):
        for name, sub in extra["properties"].items():
            yield from rows(sub, f"{path}.<key>.{name}", name in set(extra.get("required") or []))


def render_crd(crd: dict[str, Any], source: str) -> str:
    """Markdown for one CRD."""
    spec = crd["spec"]
    names = spec["names"]
    lines = [
        f"## {names['kind']}",
        "",
        f"- API group: `{spec['group']}`",
        f"- Kind: `{names['kind']}` (plural `{names['plural']}`"
        + (f", short names {', '.join('`' + s + '`' for s in names.get('shortNames', []))}" if names.get("shortNames") else "")
        + ")",
        f"- Scope: {spec['scope']}",
        f"- Source: `{source}`",
    ]
    if names.get("categories"):
        lines.append(f"- Categories: {', '.join('`' + c + '`' for c in names['categories'])}")
    for version in spec["versions"]:
        flags = [f for f, on in (("served", version.get("served")), ("storage", version.get("storage"))) if on]
        lines += ["", f"### {spec['group']}/{version['name']} ({', '.join(flags)})", ""]
        columns = version.get("additionalPrinterColumns") or []
        if columns:
            lines += ["`kubectl get` columns: " + ", ".join(
                f"{c['name']} (`{c['jsonPath']}`)" for c in columns), ""]
        sub = version.get("subresources") or {}
        if sub:
            lines += ["Subresources: " + ", ".join(f"`{k}`" for k in sub), ""]
        schema = version["schema"]["openAPIV3Schema"]
        top_rules = validation_of(schema, False)
        if top_rules:
            lines += ["Object-level validation: " + "; ".join(top_rules), ""]
        for section in ("spec", "status"):
            node = (schema.get("properties") or {}).get(section)
            if not node:
                continue
            lines += [f"#### {section}", "",
                      "| Field | Type | Default | Validation | Description |",
                      "| --- | --- | --- | --- | --- |"]
            required = section in set(schema.get("required") or [])
            for path, typ, default, validation, description in rows(node, section, required):
                lines.append(f"| `{path}` | {_cell(typ)} | {_cell(default)} | "
                             f"{_cell(validation)} | {_cell(description)} |")
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def generate(crd_dir: Path = CRDS) -> str:
    """The whole reference document for every CRD file in `crd_dir`."""
    parts = [
        "# CRD reference",
        "",
        "<!-- Generated by scripts/checks/gen_crd_reference.py from crds/. Do not edit by hand:",
        "     run `.venv/bin/python scripts/checks/gen_crd_reference.py`. A test fails when stale. -->",
        "",
        "Every field of the custom resources dchat-operator serves, with its type, default and",
        "the validation the API server applies (OpenAPI schema and CEL rules). Further checks",
        "the operator makes surface as a `Degraded` condition.",
        "",
    ]
    files = sorted(crd_dir.glob("*.yaml"))
    for path in files:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "CustomResourceDefinition":
                parts.append(render_crd(doc, f"crds/{path.name}"))
    return "\n".join(parts).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail when the file is stale")
    args = parser.parse_args(argv)
    text = generate()
    if args.check:
        current = OUTPUT.read_text() if OUTPUT.exists() else ""
        if current != text:
            print(f"{OUTPUT.relative_to(ROOT)} is stale: run scripts/checks/gen_crd_reference.py",
                  file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
