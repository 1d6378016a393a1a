#!/usr/bin/env python3
"""Fills in the krew manifest template of kubectl-dchat (kubectl-dchat/krew/dchat.yaml)
for a release: the version, the repository, and the sha256 of each archive.

  krew_manifest.py --template kubectl-dchat/krew/dchat.yaml --version v1.4.2 \\
      --repository dchat/dchat-operator --dist dist > dist/dchat.yaml

`--dist` holds the archives the release workflow built, named
kubectl-dchat_<version>_<os>_<arch>.tar.gz. A missing archive, a placeholder left over or
a placeholder the template does not have is an error: a manifest is never published with
a wrong or empty checksum. Only the Python standard library is used.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
from pathlib import Path

# (os, arch) pairs the release builds; each has a SHA256_<OS>_<ARCH> placeholder.
PLATFORMS = (("linux", "amd64"), ("linux", "arm64"), ("darwin", "amd64"), ("darwin", "arm64"))
VERSION = re.compile(r"^v(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(-[0-9A-Za-z.-]+)?$")
PLACEHOLDER = re.compile(r"\{\{([A-Z0-9_]+)\}\}")


class ManifestError(Exception):
    """The manifest cannot be filled in; the message says what is missing."""


def archive_name(version: str, os_name: str, arch: str) -> str:
    """The archive of one platform, as the release workflow names it."""
    return f"kubectl-dchat_{version}_{os_name}_{arch}.tar.gz"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def values(version: str, repository: str, dist: Path) -> dict[str, str]:
    """Every placeholder's value."""
    if not VERSION.match(version):
        raise ManifestError(f"version {version!r} is not like v1.4.2")
    if not re.match(r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$", repository):
        raise ManifestError(f"repository {repository!r} is not OWNER/NAME")
    found = {"VERSION": version, "REPOSITORY": repository}
    for os_name, arch in PLATFORMS:
        archive = dist / archive_name(version, os_name, arch)
        if not archive.is_file():
            raise ManifestError(f"{archive} is missing")
        found[f"SHA256_{os_name.upper()}_{arch.upper()}"] = sha256_of(archive)
    return found


def render(template: str, filled: dict[str, str]) -> str:
    """The template with every placeholder replaced."""
    used = set(PLACEHOLDER.findall(template))
    unknown = used - set(filled)
    if unknown:
        raise ManifestError(f"the template has placeholders without a value: {sorted(unknown)}")
    unused = set(filled) - used
    if unused:
        raise ManifestError(f"values the template does not use: {sorted(unused)}")
    # The template's leading comment describes the template; the manifest gets its own.
    lines = template.splitlines(keepends=True)
    while lines and lines[0].startswith("#"):
        lines.pop(0)
    header = "# kubectl-dchat krew manifest, generated from kubectl-dchat/krew/dchat.yaml\n"
    return header + PLACEHOLDER.sub(lambda m: filled[m.group(1)], "".join(lines))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--template", type=Path, required=True)
    parser.add_argument("--version", required=True, help="the release tag, e.g. v1.4.2")
    parser.add_argument("--repository", required=True, help="OWNER/NAME on GitHub")
    parser.add_argument("--dist", type=Path, required=True, help="folder with the archives")
    args = parser.parse_args(argv)
    try:
        text = render(args.template.read_text(), values(args.version, args.repository, args.dist))
    except (ManifestError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
