# One customer-managed key per data class, so a key policy or a key deletion affects only
# that class: RDS (storage, Performance Insights, master secret), S3 backups, logs.

data "aws_iam_policy_document" "kms_default" {
  # This is a KMS key policy: "Resource: *" means "this key", and the account root principal
  # only delegates to IAM policies (the AWS default key policy).
  # checkov:skip=CKV_AWS_111:Key policy; Resource * is the key itself and access is delegated to IAM.
  # checkov:skip=CKV_AWS_356:Key policy; Resource * is the key itself, not every resource.
  # checkov:skip=CKV_AWS_109:Key policy; only the account root (IAM delegation) may manage the key.
  # Account administrators manage the key through IAM; services get access through grants
  # and the statements below.
  statement {
    sid       = "AccountAdministration"
    actions   = ["kms:*"]
    resources = ["*"]
    principals {
      type        = "AWS"
      identifiers = ["arn:${local.partition}:iam::${local.account_id}:root"]
    }
  }
}

data "aws_iam_policy_document" "kms_logs" {
  source_policy_documents = [data.aws_iam_policy_document.kms_default.json]

  statement {
    sid       = "CloudWatchLogs"
    actions   = ["kms:Encrypt*", "kms:Decrypt*", "kms:ReEncrypt*", "kms:GenerateDataKey*", "kms:Describe*"]
    resources = ["*"]
    principals {
      type        = "Service"
      identifiers = ["logs.${var.region}.amazonaws.com"]
    }
    condition {
      test     = "ArnLike"
      variable = "kms:EncryptionContext:aws:logs:arn"
      values   = ["arn:${local.partition}:logs:${var.region}:${local.account_id}:log-group:*"]
    }
  }
}

resource "aws_kms_key" "rds" {
  description             = "${local.name} RDS storage, Performance Insights and master secret"
  enable_key_rotation     = true
  deletion_window_in_days = 30
  policy                  = data.aws_iam_policy_document.kms_default.json
}

resource "aws_kms_alias" "rds" {
  name          = "alias/${local.name}-rds"
  target_key_id = aws_kms_key.rds.key_id
}

resource "aws_kms_key" "backups" {
  description             = "${local.name} S3 relay backups"
  enable_key_rotation     = true
  deletion_window_in_days = 30
  policy                  = data.aws_iam_policy_document.kms_default.json
}

resource "aws_kms_alias" "backups" {
  name          = "alias/${local.name}-backups"
  target_key_id = aws_kms_key.backups.key_id
}

resource "aws_kms_key" "logs" {
  description             = "${local.name} CloudWatch log groups (VPC flow logs, RDS)"
  enable_key_rotation     = true
  deletion_window_in_days = 30
  policy                  = data.aws_iam_policy_document.kms_logs.json
}

resource "aws_kms_alias" "logs" {
  name          = "alias/${local.name}-logs"
  target_key_id = aws_kms_key.logs.key_id
}
