# IAM roles for Kubernetes ServiceAccounts (IRSA). Each role trusts exactly one
# ServiceAccount through the cluster's OIDC provider.

# AWS Load Balancer Controller prerequisite: its role with the upstream policy.
module "alb_controller_irsa" {
  # checkov:skip=CKV_TF_1:Registry modules cannot be referenced by commit hash; they are pinned by a version constraint and resolved once into .terraform.lock.hcl / the module cache during init.
  source  = "terraform-aws-modules/iam/aws//modules/iam-role-for-service-accounts-eks"
  version = "~> 5.60"

  role_name                              = "${local.name}-aws-load-balancer-controller"
  attach_load_balancer_controller_policy = true

  oidc_providers = {
    main = {
      provider_arn               = module.eks.oidc_provider_arn
      namespace_service_accounts = ["kube-system:aws-load-balancer-controller"]
    }
  }
}

# EBS CSI driver (relay StatefulSet volumes, gp3).
module "ebs_csi_irsa" {
  # checkov:skip=CKV_TF_1:Registry modules cannot be referenced by commit hash; they are pinned by a version constraint and resolved once into .terraform.lock.hcl / the module cache during init.
  source  = "terraform-aws-modules/iam/aws//modules/iam-role-for-service-accounts-eks"
  version = "~> 5.60"

  role_name             = "${local.name}-ebs-csi"
  attach_ebs_csi_policy = true

  oidc_providers = {
    main = {
      provider_arn               = module.eks.oidc_provider_arn
      namespace_service_accounts = ["kube-system:ebs-csi-controller-sa"]
    }
  }
}

# Backups: the relays' ServiceAccounts, under which the operator's backup, restore and
# delete Jobs run (`dchat backup`), write to the one S3 bucket and snapshot the one RDS
# instance. The operator itself makes no AWS call and has no role.
data "aws_iam_policy_document" "relay_backups_trust" {
  statement {
    actions = ["sts:AssumeRoleWithWebIdentity"]
    principals {
      type        = "Federated"
      identifiers = [module.eks.oidc_provider_arn]
    }
    condition {
      test     = "StringEquals"
      variable = "${module.eks.oidc_provider}:sub"
      values   = local.relay_service_accounts
    }
    condition {
      test     = "StringEquals"
      variable = "${module.eks.oidc_provider}:aud"
      values   = ["sts.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "relay_backups" {
  name                 = "${local.name}-relay-backups"
  description          = "dchat relays (IRSA): dchat backup Jobs to S3 and RDS snapshots"
  assume_role_policy   = data.aws_iam_policy_document.relay_backups_trust.json
  max_session_duration = 3600
}

data "aws_iam_policy_document" "relay_backups" {
  statement {
    sid       = "ListBackupBucket"
    actions   = ["s3:ListBucket", "s3:ListBucketMultipartUploads"]
    resources = [aws_s3_bucket.backups.arn]
  }

  statement {
    sid = "ReadWriteBackupObjects"
    actions = [
      "s3:GetObject",
      "s3:PutObject",
      "s3:DeleteObject",
      "s3:AbortMultipartUpload",
    ]
    resources = ["${aws_s3_bucket.backups.arn}/*"]
  }

  statement {
    sid       = "BackupEncryptionKey"
    actions   = ["kms:Decrypt", "kms:GenerateDataKey"]
    resources = [aws_kms_key.backups.arn]
  }

  statement {
    sid     = "SnapshotTheRelayDatabase"
    actions = ["rds:CreateDBSnapshot", "rds:AddTagsToResource"]
    resources = [
      aws_db_instance.relay.arn,
      "arn:${local.partition}:rds:${var.region}:${local.account_id}:snapshot:${local.rds_snapshot_prefix}-*",
    ]
  }

  statement {
    sid       = "DescribeRelaySnapshots"
    actions   = ["rds:DescribeDBSnapshots"]
    resources = [
      aws_db_instance.relay.arn,
      "arn:${local.partition}:rds:${var.region}:${local.account_id}:snapshot:${local.rds_snapshot_prefix}-*",
    ]
  }

  statement {
    # Only snapshots a backup tagged as the operator's: never automated ones, never others.
    sid       = "DeleteOwnSnapshots"
    actions   = ["rds:DeleteDBSnapshot"]
    resources = ["arn:${local.partition}:rds:${var.region}:${local.account_id}:snapshot:${local.rds_snapshot_prefix}-*"]
    condition {
      test     = "StringEquals"
      variable = "rds:snapshot-tag/dchat.network/managed-by"
      values   = ["dchat-operator"]
    }
  }

  statement {
    # Snapshots of an encrypted instance are encrypted with the same key.
    sid       = "SnapshotEncryptionKey"
    actions   = ["kms:CreateGrant", "kms:DescribeKey"]
    resources = [aws_kms_key.rds.arn]
    condition {
      test     = "Bool"
      variable = "kms:GrantIsForAWSResource"
      values   = ["true"]
    }
  }
}

resource "aws_iam_role_policy" "relay_backups" {
  name   = "dchat-relay-backups"
  role   = aws_iam_role.relay_backups.id
  policy = data.aws_iam_policy_document.relay_backups.json
}
