"""docs/crd-reference.md is generated from crds/ and kept current; the generator documents
every field with type, default, validation and description."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import gen_crd_reference as gen
from delivery_lib import CRD_FILE, ROOT

FIXTURE = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.example.com"},
    "spec": {
        "group": "example.com",
        "names": {"kind": "Widget", "plural": "widgets", "shortNames": ["wd"]},
        "scope": "Namespaced",
        "versions": [{
            "name": "v1", "served": True, "storage": True,
            "subresources": {"status": {}},
            "additionalPrinterColumns": [{"name": "Phase", "type": "string",
                                          "jsonPath": ".status.phase"}],
            "schema": {"openAPIV3Schema": {
                "type": "object",
                "properties": {
                    "spec": {
                        "type": "object", "required": ["size"],
                        "x-kubernetes-validations": [{"rule": "self.min <= self.max",
                                                      "message": "min must not exceed max"}],
                        "properties": {
                            "size": {"type": "integer", "format": "int32", "minimum": 1,
                                     "maximum": 9, "description": "How big | really."},
                            "mode": {"type": "string", "enum": ["fast", "safe"],
                                     "default": "safe", "description": "Mode."},
                            "labels": {"type": "object",
                                       "additionalProperties": {"type": "string"}},
                            "ports": {"type": "array", "items": {
                                "type": "object", "required": ["port"],
                                "properties": {"port": {"type": "integer"}}}},
                            "pod": {"type": "object", "properties": {
                                "big": {"type": "object", "description": "An embedded type.",
                                        "properties": {f"f{i}": {"type": "string"}
                                                       for i in range(50)}}}},
                        },
                    },
                    "status": {"type": "object", "properties": {
                        "phase": {"type": "string", "description": "Lifecycle\nphase."}}},
                },
            }},
        }],
    },
}


def test_generator_documents_every_field(tmp_path: Path) -> None:
    (tmp_path / "widgets.yaml").write_text(yaml.safe_dump(FIXTURE))
    text = gen.generate(tmp_path)
    assert "## Widget" in text and "short names `wd`" in text
    assert "Phase (`.status.phase`)" in text
    assert "| `spec.size` | integer (int32) |  | required; >= 1; <= 9 | How big \\| really. |" in text
    assert "| `spec.mode` | string | `safe` | one of `fast`, `safe` | Mode. |" in text
    assert "| `spec.labels` | map[string]string |" in text
    assert "| `spec.ports[].port` | integer |  | required |" in text
    assert "rule `self.min <= self.max`: min must not exceed max" in text
    assert "| `status.phase` | string |  |  | Lifecycle phase. |" in text
    # An embedded type with 50 fields becomes one row.
    assert "`spec.pod.big`" in text and "`spec.pod.big.f1`" not in text
    assert "kubectl explain" in text


def test_reference_is_current() -> None:
    if not CRD_FILE.exists():
        pytest.skip("crds/dchatclusters.dchat.network.yaml is not generated yet")
    doc = ROOT / "docs" / "crd-reference.md"
    assert doc.exists(), "docs/crd-reference.md missing: run scripts/checks/gen_crd_reference.py"
    assert doc.read_text() == gen.generate(), \
        "docs/crd-reference.md is stale: run scripts/checks/sync-generated.sh"


def test_reference_covers_the_contract_fields() -> None:
    if not CRD_FILE.exists():
        pytest.skip("crds/dchatclusters.dchat.network.yaml is not generated yet")
    text = (ROOT / "docs" / "crd-reference.md").read_text()
    for path in ("spec.version", "spec.replicas", "spec.database.secretRef.name",
                 "status.phase", "status.activeVersion", "status.conditions"):
        assert f"| `{path}` |" in text, path
