"""deny.toml: well-formed cargo-deny policy, and (offline) every crate in Cargo.lock whose
sources are on this machine has a license expression the policy allows."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from delivery_lib import ROOT

DENY = tomllib.loads((ROOT / "deny.toml").read_text())


def satisfiable(expression: str, allowed: set[str]) -> bool:
    """Evaluate an SPDX license expression: OR needs one side allowed, AND both; `A WITH B`
    is one license id. Legacy `A/B` means OR."""
    tokens = re.findall(r"\(|\)|[A-Za-z0-9.+-]+", expression.replace("/", " OR "))
    pos = 0

    def atom() -> bool:
        nonlocal pos
        tok = tokens[pos]
        pos += 1
        if tok == "(":
            value = disjunction()
            assert tokens[pos] == ")", expression
            pos += 1
            return value
        if pos < len(tokens) and tokens[pos] == "WITH":
            tok = f"{tok} WITH {tokens[pos + 1]}"
            pos += 2
        return tok in allowed

    def conjunction() -> bool:
        nonlocal pos
        value = atom()
        while pos < len(tokens) and tokens[pos] == "AND":
            pos += 1
            value = atom() and value
        return value

    def disjunction() -> bool:
        nonlocal pos
        value = conjunction()
        while pos < len(tokens) and tokens[pos] == "OR":
            pos += 1
            value = conjunction() or value
        return value

    result = disjunction()
    assert pos == len(tokens), f"trailing tokens in {expression!r}"
    return result


def test_expression_evaluator() -> None:
    allowed = {"MIT", "Apache-2.0 WITH LLVM-exception"}
    assert satisfiable("MIT OR GPL-3.0", allowed)
    assert not satisfiable("MIT AND GPL-3.0", allowed)
    assert satisfiable("(GPL-3.0 OR MIT) AND Apache-2.0 WITH LLVM-exception", allowed)
    assert satisfiable("Apache-2.0/MIT", allowed)
    assert not satisfiable("LGPL-2.1-or-later", allowed)


def test_policy_shape() -> None:
    assert DENY["advisories"]["version"] == 2 and DENY["advisories"]["yanked"] == "deny"
    assert DENY["licenses"]["version"] == 2
    assert "GPL-3.0" not in DENY["licenses"]["allow"]
    assert DENY["bans"]["wildcards"] == "deny"
    assert DENY["sources"]["unknown-git"] == "deny"
    assert DENY["sources"]["unknown-registry"] == "deny"
    for entry in DENY["advisories"].get("ignore", []):
        assert isinstance(entry, dict) and entry.get("reason"), \
            "every ignored advisory needs a stated reason"


def _registry_src() -> list[Path]:
    home = Path.home() / ".cargo" / "registry" / "src"
    return sorted(home.glob("*")) if home.exists() else []


def test_locked_crates_have_allowed_licenses() -> None:
    lock = tomllib.loads((ROOT / "Cargo.lock").read_text())
    allowed = set(DENY["licenses"]["allow"])
    banned = {b["crate"] for b in DENY["bans"].get("deny", [])}
    roots = _registry_src()
    checked, bad = 0, []
    for pkg in lock["package"]:
        assert pkg["name"] not in banned, f"{pkg['name']} is banned in deny.toml"
        source = pkg.get("source", "")
        if not source:
            continue  # workspace crates
        assert source.startswith("registry+https://github.com/rust-lang/crates.io-index"), \
            f"{pkg['name']} comes from {source}, which deny.toml does not allow"
        for root in roots:
            manifest = root / f"{pkg['name']}-{pkg['version']}" / "Cargo.toml"
            if manifest.exists():
                meta = tomllib.loads(manifest.read_text())["package"]
                expr = meta.get("license")
                checked += 1
                if not expr or not satisfiable(expr, allowed):
                    bad.append(f"{pkg['name']} {pkg['version']}: {expr}")
                break
    if checked == 0:
        pytest.skip("no crate sources downloaded yet (cargo fetch has not run)")
    assert not bad, "licenses deny.toml does not allow:\n" + "\n".join(bad)
