output "vpc_id" {
  description = "VPC id."
  value       = module.vpc.vpc_id
}

output "eks_cluster_name" {
  description = "EKS cluster name (aws eks update-kubeconfig --name ...)."
  value       = module.eks.cluster_name
}

output "eks_cluster_endpoint" {
  description = "EKS API endpoint."
  value       = module.eks.cluster_endpoint
}

output "operator_role_arn" {
  description = "IAM role of the operator's ServiceAccount (IRSA); also usable as spec.pod.serviceAccountAnnotations for relay backup jobs."
  value       = aws_iam_role.operator.arn
}

output "backup_bucket" {
  description = "S3 bucket for spec.backup.s3.bucket."
  value       = aws_s3_bucket.backups.id
}

output "backup_kms_key_arn" {
  description = "KMS key encrypting the backup bucket."
  value       = aws_kms_key.backups.arn
}

output "rds_instance_identifier" {
  description = "RDS instance for spec.backup.rds.instanceIdentifier."
  value       = aws_db_instance.relay.identifier
}

output "rds_endpoint" {
  description = "PostgreSQL host:port for the relay database Secret."
  value       = aws_db_instance.relay.endpoint
}

output "rds_master_secret_arn" {
  description = "Secrets Manager secret holding the generated master credentials (sync it into the DchatCluster database Secret, e.g. with External Secrets)."
  value       = aws_db_instance.relay.master_user_secret[0].secret_arn
}

output "certificate_arn" {
  description = "ACM certificate for spec.ingress.annotations alb.ingress.kubernetes.io/certificate-arn."
  value       = aws_acm_certificate_validation.relay.certificate_arn
}

output "rds_snapshot_prefix" {
  description = "Prefix the operator must use for RDS snapshot names (its IAM policy allows only these)."
  value       = local.rds_snapshot_prefix
}
