"""The krew manifest of kubectl-dchat: the template is valid YAML with every field krew
requires, .github/scripts/krew_manifest.py fills it in for exactly the archives the
release workflow builds, and refuses to publish one with a missing checksum."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import yaml

from delivery_lib import ROOT

TEMPLATE = ROOT / "kubectl-dchat" / "krew" / "dchat.yaml"
_spec = importlib.util.spec_from_file_location("krew_manifest", ROOT / ".github" / "scripts" / "krew_manifest.py")
assert _spec and _spec.loader
krew = importlib.util.module_from_spec(_spec)
sys.modules["krew_manifest"] = krew
_spec.loader.exec_module(krew)


def _release_matrix() -> list[dict[str, str]]:
    wf = yaml.safe_load((ROOT / ".github" / "workflows" / "release.yml").read_text())
    return wf["jobs"]["plugin"]["strategy"]["matrix"]["include"]


def _check_plugin(manifest: dict, *, rendered: bool) -> None:
    """What krew's validation (pkg/index/validation) requires of a plugin manifest."""
    assert manifest["apiVersion"] == "krew.googlecontainertools.github.com/v1alpha2"
    assert manifest["kind"] == "Plugin"
    name = manifest["metadata"]["name"]
    assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", name), name
    spec = manifest["spec"]
    assert spec["shortDescription"] and len(spec["shortDescription"]) <= 50
    assert spec["description"].strip() and spec["homepage"]
    platforms = spec["platforms"]
    assert platforms, "at least one platform"
    for platform in platforms:
        labels = platform["selector"]["matchLabels"]
        assert set(labels) == {"os", "arch"}
        assert platform["bin"] == f"kubectl-{name.replace('-', '_')}" == "kubectl-dchat"
        assert any(f["from"] == "kubectl-dchat" for f in platform["files"])
        assert platform["uri"].startswith("https://") and platform["uri"].endswith(".tar.gz")
        suffix = f"_{labels['os']}_{labels['arch']}.tar.gz"
        assert platform["uri"].endswith(suffix), platform["uri"]
        if rendered:
            assert re.fullmatch(r"[0-9a-f]{64}", platform["sha256"]), platform["sha256"]
            assert re.fullmatch(r"v\d+\.\d+\.\d+(-[0-9A-Za-z.-]+)?", spec["version"])
    selectors = sorted((p["selector"]["matchLabels"]["os"], p["selector"]["matchLabels"]["arch"]) for p in platforms)
    assert len(set(selectors)) == len(selectors), "one entry per platform"


def test_the_template_is_a_valid_plugin_manifest_with_placeholders() -> None:
    manifest = yaml.safe_load(TEMPLATE.read_text())
    _check_plugin(manifest, rendered=False)
    assert manifest["spec"]["version"] == "{{VERSION}}"


def test_the_template_covers_exactly_the_platforms_the_release_builds() -> None:
    manifest = yaml.safe_load(TEMPLATE.read_text())
    in_manifest = sorted((p["selector"]["matchLabels"]["os"], p["selector"]["matchLabels"]["arch"])
                         for p in manifest["spec"]["platforms"])
    built = sorted((m["os"], m["arch"]) for m in _release_matrix())
    assert in_manifest == built == sorted(krew.PLATFORMS)


def _archives(dist: Path, version: str) -> dict[tuple[str, str], bytes]:
    contents = {}
    for os_name, arch in krew.PLATFORMS:
        data = f"{os_name}-{arch}".encode()
        (dist / krew.archive_name(version, os_name, arch)).write_bytes(data)
        contents[(os_name, arch)] = data
    return contents


def test_rendering_fills_in_version_repository_and_checksums(tmp_path: Path) -> None:
    import hashlib

    contents = _archives(tmp_path, "v1.4.2")
    text = krew.render(TEMPLATE.read_text(), krew.values("v1.4.2", "dchat/dchat-operator", tmp_path))
    assert "{{" not in text
    manifest = yaml.safe_load(text)
    _check_plugin(manifest, rendered=True)
    assert manifest["spec"]["version"] == "v1.4.2"
    for platform in manifest["spec"]["platforms"]:
        labels = platform["selector"]["matchLabels"]
        key = (labels["os"], labels["arch"])
        assert platform["sha256"] == hashlib.sha256(contents[key]).hexdigest()
        assert platform["uri"] == ("https://github.com/dchat/dchat-operator/releases/download/v1.4.2/"
                                   + krew.archive_name("v1.4.2", *key))


def test_a_missing_archive_or_a_bad_version_fails(tmp_path: Path) -> None:
    _archives(tmp_path, "v1.4.2")
    (tmp_path / krew.archive_name("v1.4.2", "darwin", "arm64")).unlink()
    with pytest.raises(krew.ManifestError, match="darwin_arm64.tar.gz is missing"):
        krew.values("v1.4.2", "dchat/dchat-operator", tmp_path)
    with pytest.raises(krew.ManifestError, match="not like v1.4.2"):
        krew.values("1.4.2", "dchat/dchat-operator", tmp_path)


def test_a_placeholder_without_value_fails() -> None:
    with pytest.raises(krew.ManifestError, match="SHA256_WINDOWS_AMD64"):
        krew.render("sha256: {{SHA256_WINDOWS_AMD64}}\nversion: {{VERSION}}", {"VERSION": "v1.0.0"})


def test_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _archives(tmp_path, "v0.1.0")
    args = ["--template", str(TEMPLATE), "--version", "v0.1.0", "--repository", "o/r", "--dist", str(tmp_path)]
    assert krew.main(args) == 0
    assert yaml.safe_load(capsys.readouterr().out)["spec"]["version"] == "v0.1.0"
    assert krew.main([*args[:-1], str(tmp_path / "empty")]) == 1
    assert "is missing" in capsys.readouterr().err
