#!/usr/bin/env bash
# Checks the delivery assets without a cluster or a cloud account: Helm charts (lint,
# render, Kubernetes schema validation, RBAC and security context), GitHub workflows
# (actionlint), Terraform (parse + checkov), images, monitoring assets and generated docs.
#
# Usage: scripts/check-delivery.sh [pytest args...]
# Needs the .venv made by scripts/ensure-deps.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/pytest ]; then
  echo "check-delivery: .venv/bin/pytest missing; run scripts/ensure-deps.sh" >&2
  exit 1
fi

# python-hcl2 in its own directory (see scripts/requirements.txt for why), reinstalled
# only when its requirements file changes.
hcl2_dir=.venv/python-hcl2
if ! cmp -s scripts/checks/requirements-hcl2.txt "$hcl2_dir/.requirements.installed"; then
  rm -rf "$hcl2_dir"
  .venv/bin/pip install -q --disable-pip-version-check --target "$hcl2_dir" \
    -r scripts/checks/requirements-hcl2.txt
  cp scripts/checks/requirements-hcl2.txt "$hcl2_dir/.requirements.installed"
fi

set +e
.venv/bin/pytest -q -p no:cacheprovider scripts/checks "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  # pytest exit 5 = no tests collected: a delivery check that checks nothing is a failure.
  echo "check-delivery: no tests were collected" >&2
  exit 1
fi
exit "$rc"
