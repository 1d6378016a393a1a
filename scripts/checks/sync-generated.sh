#!/usr/bin/env bash
# Regenerates every file derived from the operator binary, so they cannot drift apart:
#   crds/dchatclusters.dchat.network.yaml      (dchat-operator crd dchatclusters.dchat.network)
#   crds/dchatbackups.dchat.network.yaml       (dchat-operator crd dchatbackups.dchat.network)
#   charts/dchat-operator/crds/                (copy of crds/, shipped by the chart)
#   charts/dchat-operator/files/rbac-rules.yaml (dchat-operator rbac, granted by the chart)
#   docs/crd-reference.md                      (scripts/checks/gen_crd_reference.py)
# scripts/check-delivery.sh fails when any of them is stale. Run after changing the API
# types or the RBAC table, then commit the results with that change.
#
# Usage: scripts/checks/sync-generated.sh   (uses DCHAT_OPERATOR_BIN if set, else cargo run)
set -euo pipefail
cd "$(dirname "$0")/../.."

operator() {
  if [ -n "${DCHAT_OPERATOR_BIN:-}" ]; then
    "$DCHAT_OPERATOR_BIN" "$@"
  else
    cargo run -q -p dchat-operator -- "$@"
  fi
}

crd_tmp=$(mktemp)
backup_crd_tmp=$(mktemp)
rbac_tmp=$(mktemp)
trap 'rm -f "$crd_tmp" "$backup_crd_tmp" "$rbac_tmp"' EXIT
# Generate into temporary files first: a failing command must not truncate a committed file.
operator crd dchatclusters.dchat.network > "$crd_tmp"
operator crd dchatbackups.dchat.network > "$backup_crd_tmp"
operator rbac > "$rbac_tmp"

cp "$crd_tmp" crds/dchatclusters.dchat.network.yaml
cp "$backup_crd_tmp" crds/dchatbackups.dchat.network.yaml
mkdir -p charts/dchat-operator/crds
rm -f charts/dchat-operator/crds/*.yaml
cp crds/*.yaml charts/dchat-operator/crds/
{
  echo "# Generated: scripts/checks/sync-generated.sh (dchat-operator rbac). Do not edit."
  echo "# The exact PolicyRules the operator uses. templates/rbac.yaml grants these and nothing"
  echo "# else (leases only in the release namespace); scripts/checks/test_operator_chart.py"
  echo "# fails when this file, the rendered roles and \`dchat-operator rbac\` disagree."
  cat "$rbac_tmp"
} > charts/dchat-operator/files/rbac-rules.yaml
.venv/bin/python scripts/checks/gen_crd_reference.py
echo "regenerated crds/, charts/dchat-operator/crds/, charts/dchat-operator/files/rbac-rules.yaml, docs/crd-reference.md"
