"""Delivery docs: links resolve (files and heading anchors), the architecture page has its
mermaid diagram, and the install guide only mentions chart values that exist."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from delivery_lib import OPERATOR_CHART, ROOT

DOCS = ROOT / "docs"
# Every page of docs/ except the generated CRD reference (its patterns look like links).
PAGES = sorted([*(p for p in DOCS.glob("*.md") if p.name != "crd-reference.md"), ROOT / "README.md",
                *(DOCS / "monitoring").glob("*.md"), *(DOCS / "runbooks").glob("*.md"),
                *(ROOT / "charts").glob("*/README.md"), ROOT / "terraform" / "aws" / "README.md"])


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"(?s)```.*?```", "", path.read_text())
    return {slug(m) for m in re.findall(r"(?m)^#{1,6}\s+(.+?)\s*$", text)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    text = re.sub(r"(?s)```.*?```", "", page.read_text())
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+://", target) or target.startswith("mailto:"):
            continue
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        assert dest.exists(), f"{page.name}: link to missing {target}"
        if anchor and dest.suffix == ".md":
            assert anchor in anchors(dest), f"{page.name}: no heading #{anchor} in {file_part or page.name}"


def test_slug_matches_github() -> None:
    assert slug("2. Database Secret") == "2-database-secret"
    assert slug("Blue-green rollout") == "blue-green-rollout"


def test_architecture_has_a_mermaid_diagram_of_the_system() -> None:
    text = (DOCS / "architecture.md").read_text()
    blocks = re.findall(r"(?s)```mermaid\n(.*?)```", text)
    assert len(blocks) >= 1
    diagram = blocks[0]
    assert diagram.lstrip().startswith(("flowchart", "graph"))
    for node in ("dchat-operator", "DchatCluster", "RDS", "S3", "StatefulSet", "Prometheus"):
        assert node in diagram, node
    # Every edge endpoint is a node id declared somewhere in the diagram.
    declared = set(re.findall(r"(?m)^\s*(\w+)\s*[\[({]", diagram)) | \
        set(re.findall(r"subgraph\s+(\w+)", diagram))
    for line in diagram.splitlines():
        if "-->" in line or "<-->" in line or "-.->" in line:
            for ident in re.findall(r"(?:^|-->|-\.->|<-->|&|\|)\s*(\w+)\s*(?=$|&|-->|-\.->|<-->|\[)",
                                    line.strip()):
                assert ident in declared, f"edge uses undeclared node {ident}: {line.strip()}"


def _has_value(values: dict[str, Any], dotted: str) -> bool:
    node: Any = values
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def test_install_guide_mentions_only_real_chart_values() -> None:
    values = yaml.safe_load((OPERATOR_CHART / "values.yaml").read_text())
    text = (DOCS / "install.md").read_text()
    table_values = re.findall(r"(?m)^\| `([a-zA-Z.]+)`(?: / `([a-zA-Z.]+)`)? \|", text)
    mentioned = {v for pair in table_values for v in pair if v}
    set_values = set(re.findall(r"--set ([a-zA-Z.]+)=", text.split("dchat-cluster chart")[0]))
    assert mentioned, "install.md should document the main values"
    for name in mentioned | set_values:
        assert _has_value(values, name), f"install.md mentions unknown value {name}"
    assert "helm install dchat-operator" in text and "kind: DchatCluster" in text


# Fields a doc may name under `spec.` that the CRD does not have (none today: every field
# the docs name must exist in the CRD).
PENDING_SPEC_FIELDS: set[str] = set()
# `spec.` paths of other kinds quoted in the docs (a Lease in operator-down.md, a
# DchatBackup in backup.md).
OTHER_KINDS = {"spec.holderIdentity", "spec.renewTime",
               # a DchatBackup's spec (backup.md)
               "spec.cluster", "spec.cluster.name", "spec.deletionPolicy"}


def _crd_has(schema: dict[str, Any], dotted: str) -> bool:
    node = schema
    for part in dotted.split(".")[1:]:
        props = node.get("properties") or {}
        if part not in props:
            return False
        node = props[part]
    return True


def test_docs_name_only_real_dchatcluster_fields() -> None:
    from crd_schema import load_crd, version_schema
    from delivery_lib import CRD_FILE

    if not CRD_FILE.exists():
        pytest.skip("crds/ not generated yet")
    spec = version_schema(load_crd(CRD_FILE), "v1alpha1")["properties"]["spec"]
    pages = PAGES + [ROOT / "charts" / "dchat-cluster" / "README.md"]
    for page in pages:
        for path in sorted(set(re.findall(r"\bspec(?:\.[a-zA-Z0-9]+)+", page.read_text()))):
            path = path.rstrip(".")
            if path in OTHER_KINDS or any(path == p or path.startswith(p + ".")
                                          for p in PENDING_SPEC_FIELDS):
                continue
            assert _crd_has(spec, path), f"{page.relative_to(ROOT)} names {path}, not in the CRD"
