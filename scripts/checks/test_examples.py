"""Every file in examples/ is something a user can apply as is: each DchatCluster passes the
CRD schema strictly (unknown fields are errors), every other object and every child the
operator renders for it validate strictly against the Kubernetes schemas of the lowest and
highest supported versions."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from crd_schema import load_crd, validate_custom_resource
from delivery_lib import KUBE_VERSIONS, kube_validate, operator_cli

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
CRD = load_crd(ROOT / "crds" / "dchatclusters.dchat.network.yaml")
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_there_are_dev_and_production_examples() -> None:
    names = {p.name for p in EXAMPLES}
    assert {"dev.yaml", "production.yaml"} <= names, names


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_objects_validate(path: Path, kube_version: str) -> None:
    for doc in documents(path):
        if doc["kind"] == "DchatCluster":
            validate_custom_resource(doc, CRD)
        else:
            kube_validate(doc, kube_version)


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_rendered_children_validate(path: Path, kube_version: str) -> None:
    if not any(d["kind"] == "DchatCluster" for d in documents(path)):
        pytest.skip(f"{path.name} holds no DchatCluster")
    # A failure to render is a test failure, not a skip: the examples must always render.
    children = [d for d in yaml.safe_load_all(operator_cli("render", "-f", str(path))) if d]
    assert any(c["kind"] == "StatefulSet" for c in children)
    for child in children:
        if child["kind"] in CRD_KINDS:
            assert child["apiVersion"] == "monitoring.coreos.com/v1"
            continue
        kube_validate(child, kube_version)
