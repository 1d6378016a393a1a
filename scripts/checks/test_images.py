"""operator/Dockerfile, relay/Dockerfile and .dockerignore: multi-stage, minimal non-root
runtime, pinned bases, build context that contains what COPY needs and nothing secret."""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

import pytest

from delivery_lib import ROOT

DOCKERFILES = [ROOT / "operator" / "Dockerfile", ROOT / "relay" / "Dockerfile"]
# Known floating base images, each with the reason it is tolerated for now. The relay image's
# runtime base is owned by the relay crate; pinning it (a tag such as :nonroot plus a digest)
# was requested in the delivery report.
FLOATING_BASE_ALLOWED = {("relay/Dockerfile", "gcr.io/distroless/cc-debian12")}


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def _ignored(patterns: list[str], rel: str) -> bool:
    """Whether a context path is excluded (last matching pattern wins, `!` re-includes)."""
    result = False
    for pat in patterns:
        neg = pat.startswith("!")
        pat = pat[1:] if neg else pat
        pat = pat.rstrip("/")
        if fnmatch.fnmatch(rel, pat) or fnmatch.fnmatch(rel, pat.replace("**/", "")) \
                or rel.startswith(pat + "/"):
            result = not neg
    return result


def _dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


def _existing() -> list[Path]:
    found = [p for p in DOCKERFILES if p.exists()]
    assert ROOT / "operator" / "Dockerfile" in found
    return found


@pytest.mark.parametrize("path", _existing(), ids=lambda p: str(p.relative_to(ROOT)))
def test_dockerfile_is_multi_stage_non_root(path: Path) -> None:
    ins = _instructions(path)
    froms = [args for word, args in ins if word == "FROM"]
    assert len(froms) >= 2, "multi-stage build expected"
    args = {a.split("=")[0]: a.split("=", 1)[1] for w, a in ins if w == "ARG" and "=" in a}
    for base in froms:
        image = base.split()[0]
        for key, value in args.items():
            image = image.replace("${%s}" % key, value)
        if (str(path.relative_to(ROOT)), image) not in FLOATING_BASE_ALLOWED:
            assert ":" in image.split("/")[-1] or "@sha256:" in image, f"unpinned base {image}"
        assert not image.endswith(":latest"), f"floating base {image}"
    runtime = froms[-1].split()[0]
    assert any(s in runtime for s in ("distroless", "scratch", "chainguard", "-slim")), \
        f"runtime stage should be minimal, got {runtime}"
    final_stage = ins[max(i for i, (w, _) in enumerate(ins) if w == "FROM"):]
    users = [a for w, a in final_stage if w == "USER"]
    assert users, "runtime stage must set USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "numeric non-root USER needed for runAsNonRoot"
    assert any(w == "ENTRYPOINT" for w, _ in final_stage)
    assert not any(w == "RUN" for w, _ in final_stage if "distroless" in runtime), \
        "distroless has no shell; RUN in the runtime stage cannot work"


def test_operator_image_contract() -> None:
    ins = _instructions(ROOT / "operator" / "Dockerfile")
    entry = [a for w, a in ins if w == "ENTRYPOINT"][-1]
    assert "/usr/local/bin/dchat-operator" in entry
    assert any(w == "EXPOSE" and "8080" in a for w, a in ins)
    assert any(w == "RUN" and "--locked" in a for w, a in ins), "build with the committed Cargo.lock"


@pytest.mark.parametrize("path", _existing(), ids=lambda p: str(p.relative_to(ROOT)))
def test_servers_are_built_with_jemalloc(path: Path) -> None:
    # Both servers' measured memory and speed are with jemalloc (docs/performance.md); its
    # build needs make, and arm64 images a page size that runs on every arm64 kernel.
    runs = " ".join(a for w, a in _instructions(path) if w == "RUN")
    assert "--features jemalloc" in runs
    assert "install -y --no-install-recommends make" in runs
    assert "JEMALLOC_SYS_WITH_LG_PAGE=16" in runs


@pytest.mark.parametrize("path", _existing(), ids=lambda p: str(p.relative_to(ROOT)))
def test_context_keeps_what_copy_needs(path: Path) -> None:
    patterns = _dockerignore()
    for word, args in _instructions(path):
        if word != "COPY" or "--from=" in args:
            continue
        sources = [a for a in args.split() if not a.startswith("--")][:-1]
        for src in sources:
            src = src.rstrip("/").removeprefix("./")
            assert (ROOT / src).exists(), f"{path.name}: COPY {src} does not exist"
            assert not _ignored(patterns, src), f"{path.name}: COPY {src} is in .dockerignore"


@pytest.mark.parametrize("path", _existing(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_workspace_member_is_copied(path: Path) -> None:
    # cargo refuses to build in a workspace whose member folders are missing.
    import tomllib

    members = tomllib.loads((ROOT / "Cargo.toml").read_text())["workspace"]["members"]
    copied = [a.split()[0].rstrip("/").removeprefix("./")
              for w, a in _instructions(path) if w == "COPY" and "--from=" not in a]
    for member in members:
        assert any(member == c or member.startswith(c + "/") for c in copied), \
            f"{path.name} does not COPY workspace member {member}"


def test_dockerignore_excludes_build_output_and_secrets() -> None:
    patterns = _dockerignore()
    for rel in ("target", ".git", ".venv", "terraform/aws/prod.tfstate", "operator/target",
                "terraform/aws/.terraform"):
        assert _ignored(patterns, rel), f"{rel} should not be in the build context"
    for rel in ("Cargo.toml", "Cargo.lock", "operator/src/main.rs", "relay/src/lib.rs"):
        assert not _ignored(patterns, rel), f"{rel} is needed by the build"
