"""terraform/aws: every .tf and .tfvars parses with python-hcl2; variables are described,
typed and set by both environment files; every reference resolves; the security-relevant
settings the delivery issue requires are present; checkov reports no unsuppressed failure
and every suppression states its reason."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from functools import lru_cache
from typing import Any

import pytest

from delivery_lib import ROOT

TF = ROOT / "terraform" / "aws"
HCL2_DIR = ROOT / ".venv" / "python-hcl2"

_PARSER = r"""
import json, sys, hcl2
out = {}
for path in sys.argv[1:]:
    with open(path) as f:
        out[path] = hcl2.load(f)
json.dump(out, sys.stdout)
"""


@lru_cache(maxsize=1)
def parsed() -> dict[str, Any]:
    """Every .tf/.tfvars parsed by python-hcl2 (run from its own install dir)."""
    assert (HCL2_DIR / "hcl2").is_dir(), "python-hcl2 missing: run scripts/check-delivery.sh"
    files = sorted(str(p) for p in TF.glob("*.tf")) + sorted(str(p) for p in TF.glob("*.tfvars"))
    env = dict(os.environ, PYTHONPATH=str(HCL2_DIR))
    proc = subprocess.run([sys.executable, "-c", _PARSER, *files], capture_output=True,
                          text=True, env=env, check=False)
    assert proc.returncode == 0, f"python-hcl2 failed to parse:\n{proc.stderr[-3000:]}"
    return {os.path.basename(k): v for k, v in json.loads(proc.stdout).items()}


def unq(value: Any) -> Any:
    """python-hcl2 keeps string quotes ("\"x\""); strip them recursively."""
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    if isinstance(value, list):
        return [unq(v) for v in value]
    if isinstance(value, dict):
        return {unq(k): unq(v) for k, v in value.items() if k != "__comments__"}
    return value


def blocks(kind: str) -> dict[str, Any]:
    """All top-level blocks of one kind from every .tf file, keyed by label(s)."""
    out: dict[str, Any] = {}
    for name, doc in parsed().items():
        if not name.endswith(".tf"):
            continue
        for entry in doc.get(kind, []):
            for label, body in unq(entry).items():
                if kind in ("resource", "data"):
                    for inner, inner_body in body.items():
                        out[f"{label}.{inner}"] = inner_body
                else:
                    out[label] = body
    return out


def tfvars(env: str) -> dict[str, Any]:
    return unq(parsed()[f"{env}.tfvars"])


def _source_text() -> str:
    text = "\n".join(p.read_text() for p in sorted(TF.glob("*.tf")))
    return re.sub(r"(?m)^\s*#.*$", "", text)


def test_every_file_parses() -> None:
    names = set(parsed())
    for required in ("versions.tf", "variables.tf", "outputs.tf", "vpc.tf", "eks.tf", "rds.tf",
                     "s3.tf", "kms.tf", "iam.tf", "acm.tf", "helm.tf",
                     "staging.tfvars", "production.tfvars"):
        assert required in names


def test_variables_have_descriptions_types_and_environment_values() -> None:
    variables = blocks("variable")
    assert len(variables) >= 20
    for name, body in variables.items():
        assert body.get("description", "").strip(), f"variable {name} needs a description"
        assert "type" in body, f"variable {name} needs a type"
    validated = [n for n, b in variables.items() if b.get("validation")]
    assert len(validated) >= 15, "inputs should be validated"
    for env in ("staging", "production"):
        values = tfvars(env)
        unknown = set(values) - set(variables)
        assert not unknown, f"{env}.tfvars sets undeclared variables {unknown}"
        missing = [n for n, b in variables.items() if "default" not in b and n not in values]
        assert not missing, f"{env}.tfvars misses required variables {missing}"
        assert values["environment"] == env


def test_outputs_are_described() -> None:
    outputs = blocks("output")
    for name in ("relay_backup_role_arn", "backup_bucket", "rds_instance_identifier",
                 "certificate_arn", "eks_cluster_name"):
        assert name in outputs
    for name, body in outputs.items():
        assert body.get("description"), f"output {name} needs a description"


def test_every_reference_resolves() -> None:
    """A poor man's `terraform validate` for names: var., local., module., data. and
    resource references must point at something declared."""
    text = _source_text()
    variables = set(blocks("variable"))
    resources = set(blocks("resource"))
    datas = set(blocks("data"))
    modules = set(blocks("module"))
    local_names: set[str] = set()
    for name, doc in parsed().items():
        for entry in doc.get("locals", []) if name.endswith(".tf") else []:
            local_names |= {k for k in entry if not k.startswith("__")}
    for ref in set(re.findall(r"\bvar\.([a-z0-9_]+)", text)):
        assert ref in variables, f"var.{ref} is not declared"
    for ref in set(re.findall(r"\blocal\.([a-z0-9_]+)", text)):
        assert ref in local_names, f"local.{ref} is not declared"
    for ref in set(re.findall(r"\bmodule\.([a-z0-9_]+)", text)):
        assert ref in modules, f"module.{ref} is not declared"
    for kind, name in set(re.findall(r"\bdata\.([a-z0-9_]+)\.([a-z0-9_]+)", text)):
        assert f"{kind}.{name}" in datas, f"data.{kind}.{name} is not declared"
    for kind, name in set(re.findall(r"(?<![.\w])(aws_[a-z0-9_]+|helm_release)\.([a-z0-9_]+)", text)):
        if f"{kind}.{name}" in resources:
            continue
        pytest.fail(f"{kind}.{name} is referenced but not declared")
    unused = {v for v in variables if f"var.{v}" not in text}
    assert not unused, f"declared but unused variables: {unused}"


def test_remote_state_in_s3_with_dynamodb_locking() -> None:
    terraform = unq(parsed()["versions.tf"]["terraform"][0])
    assert "s3" in terraform["backend"][0]
    example = (TF / "backend.hcl.example").read_text()
    assert re.search(r"(?m)^dynamodb_table\s*=", example)
    assert re.search(r"(?m)^encrypt\s*=\s*true", example)


def test_environments_differ_where_the_issue_says() -> None:
    staging, production = tfvars("staging"), tfvars("production")
    assert staging["single_nat_gateway"] is True and production["single_nat_gateway"] is False
    assert staging["db_multi_az"] is False and production["db_multi_az"] is True
    assert production["db_deletion_protection"] is True
    for env in (staging, production):
        assert len(env["availability_zones"]) == 3
        assert re.match(r"^1\.(3[3-9])$", env["kubernetes_version"])
        assert all(t.startswith("c") for t in env["relay_instance_types"])


def test_vpc_and_eks_shape() -> None:
    modules = blocks("module")
    vpc, eks = modules["vpc"], modules["eks"]
    assert vpc["one_nat_gateway_per_az"] == "${!var.single_nat_gateway}"
    assert vpc["enable_flow_log"] is True
    assert vpc["public_subnet_tags"]["kubernetes.io/role/elb"] == "1"
    assert set(eks["addons"]) >= {"vpc-cni", "kube-proxy", "coredns", "aws-ebs-csi-driver",
                                  "eks-pod-identity-agent"}
    groups = eks["eks_managed_node_groups"]
    assert set(groups) == {"relay", "general"}
    assert groups["relay"]["taints"]["relay"]["effect"] == "NO_SCHEDULE"
    for g in groups.values():
        assert g["metadata_options"]["http_tokens"] == "required"
    assert "audit" in eks["enabled_log_types"]
    for g in groups.values():
        assert g["block_device_mappings"]["xvda"]["ebs"]["encrypted"] is True
    sc = blocks("resource")["kubernetes_storage_class_v1.gp3"]
    assert sc["parameters"] == {"type": "gp3", "encrypted": "true"}
    assert sc["reclaim_policy"] == "Retain" and sc["allow_volume_expansion"] is True
    default = blocks("variable")["kubernetes_version"]["default"]
    assert re.match(r"^1\.(3[3-9])$", default)


def test_rds_settings() -> None:
    db = blocks("resource")["aws_db_instance.relay"]
    assert db["multi_az"] == "${var.db_multi_az}"
    assert db["max_allocated_storage"] == "${var.db_max_allocated_storage_gb}"
    assert db["storage_encrypted"] is True and "aws_kms_key.rds" in db["kms_key_id"]
    assert db["performance_insights_enabled"] is True
    assert "aws_kms_key.rds" in db["performance_insights_kms_key_id"]
    assert db["enabled_cloudwatch_logs_exports"] == ["postgresql", "upgrade"]
    assert db["backup_retention_period"] == "${var.db_backup_retention_days}"
    assert db["publicly_accessible"] is False
    assert db["manage_master_user_password"] is True
    assert "password" not in db, "no password in Terraform state"


def test_backup_bucket_is_versioned_encrypted_private_tls_only() -> None:
    res = blocks("resource")
    assert res["aws_s3_bucket_versioning.backups"]["versioning_configuration"][0]["status"] == "Enabled"
    sse = res["aws_s3_bucket_server_side_encryption_configuration.backups"]["rule"][0]
    default = sse["apply_server_side_encryption_by_default"][0]
    assert default["sse_algorithm"] == "aws:kms" and "aws_kms_key.backups" in default["kms_master_key_id"]
    pab = res["aws_s3_bucket_public_access_block.backups"]
    for key in ("block_public_acls", "block_public_policy", "ignore_public_acls",
                "restrict_public_buckets"):
        assert pab[key] is True
    rule = res["aws_s3_bucket_lifecycle_configuration.backups"]["rule"][0]
    assert rule["status"] == "Enabled" and rule["expiration"][0]["days"] == "${var.backup_retention_days}"
    policy = blocks("data")["aws_iam_policy_document.backups_bucket"]["statement"]
    tls = [s for s in policy if s.get("effect") == "Deny"
           and any(c["variable"] == "aws:SecureTransport" and c["values"] == ["false"]
                   for c in s.get("condition", []))]
    assert tls, "bucket policy must deny non-TLS access"


def test_backup_role_is_the_relays_and_scoped_to_the_bucket_and_snapshots() -> None:
    data = blocks("data")
    trust = data["aws_iam_policy_document.relay_backups_trust"]["statement"][0]
    subs = [c for c in trust["condition"] if c["variable"].endswith(":sub")]
    assert subs and subs[0]["values"] == "${local.relay_service_accounts}"
    locals_text = (TF / "locals.tf").read_text()
    assert '"system:serviceaccount:${sa}"' in locals_text
    statements = data["aws_iam_policy_document.relay_backups"]["statement"]
    for statement in statements:
        for resource in statement["resources"]:
            assert resource != "*", f"{statement['sid']}: wildcard resource"
            assert any(ok in resource for ok in (
                "aws_s3_bucket.backups.arn", "aws_kms_key.backups.arn", "aws_kms_key.rds.arn",
                "aws_db_instance.relay.arn", ":snapshot:${local.rds_snapshot_prefix}-*")), \
                f"{statement['sid']}: {resource} is outside the bucket, key and snapshots"
        for action in statement["actions"]:
            assert not action.endswith(":*"), f"{statement['sid']}: wildcard action {action}"
    actions = {a for st in statements for a in st["actions"]}
    # What `dchat backup create|delete` call (docs/backup.md, "Permissions the command needs").
    for needed in ("s3:ListBucketMultipartUploads", "s3:PutObject", "s3:AbortMultipartUpload",
                   "rds:CreateDBSnapshot", "rds:DeleteDBSnapshot", "rds:DescribeDBSnapshots"):
        assert needed in actions, needed
    delete = next(st for st in statements if "rds:DeleteDBSnapshot" in st["actions"])
    assert any(c["variable"] == "rds:snapshot-tag/dchat.network/managed-by"
               for c in delete.get("condition", [])), "delete only the operator's snapshots"


def test_operator_helm_release_has_no_aws_role() -> None:
    release = blocks("resource")["helm_release.dchat_operator"]
    assert release["chart"] == "dchat-operator"
    assert "role-arn" not in json.dumps(release["values"]), "the operator makes no AWS call"
    assert "var.operator_chart_version" in release["version"]


def _checkov() -> dict[str, Any]:
    proc = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "checkov"), "-d", str(TF), "--framework", "terraform",
         "--skip-download", "-o", "json"],
        capture_output=True, text=True, cwd=ROOT, check=False,
        env=dict(os.environ, BC_SKIP_MAPPING="TRUE", CHECKOV_RUN_SCA_PACKAGE_SCAN_V2="false"))
    start = proc.stdout.find("{")
    assert start >= 0, f"checkov printed no report (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    report = json.loads(proc.stdout[start:])
    if isinstance(report, list):
        (report,) = [r for r in report if r.get("check_type") == "terraform"]
    return report


def test_checkov_has_no_unsuppressed_failures() -> None:
    report = _checkov()
    summary = report["summary"]
    assert summary["passed"] > 100, summary
    assert summary["parsing_errors"] == 0, report["results"]["parsing_errors"]
    failed = [f"{c['check_id']} {c['resource']} ({c['file_path']}:{c['file_line_range']})"
              for c in report["results"]["failed_checks"]]
    assert not failed, "checkov failures (fix, or suppress inline with a reason):\n" + "\n".join(failed)
    for skipped in report["results"]["skipped_checks"]:
        reason = (skipped.get("check_result") or {}).get("suppress_comment", "")
        assert len(reason.strip()) >= 20, f"{skipped['check_id']} on {skipped['resource']} " \
                                          f"is suppressed without a stated reason"


def test_every_inline_suppression_states_a_reason() -> None:
    for path in sorted(TF.glob("*.tf")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if "checkov:skip=" in line:
                m = re.search(r"checkov:skip=([A-Z0-9_]+):(.+)$", line)
                assert m and len(m.group(2).strip()) >= 20, f"{path.name}:{n}: skip without reason"
