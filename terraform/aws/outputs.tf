output "region" {
  description = "AWS region of every resource: aws eks update-kubeconfig --region, spec.backup.destination.s3.region and spec.backup.rds.region."
  value       = var.region
}

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

output "relay_backup_role_arn" {
  description = "IAM role for the relays' ServiceAccount (IRSA) of clusters with spec.backup: set spec.pod.serviceAccountAnnotations eks.amazonaws.com/role-arn to it."
  value       = aws_iam_role.relay_backups.arn
}

output "backup_bucket" {
  description = "S3 bucket for spec.backup.destination.s3.bucket."
  value       = aws_s3_bucket.backups.id
}

output "backup_kms_key_arn" {
  description = "KMS key encrypting the backup bucket (its default); spec.backup.destination.s3.kmsKeyId, with encryption aws:kms."
  value       = aws_kms_key.backups.arn
}

output "rds_instance_identifier" {
  description = "RDS instance for spec.backup.rds.instanceIdentifier."
  value       = aws_db_instance.relay.identifier
}

output "rds_endpoint" {
  description = "PostgreSQL host:port."
  value       = aws_db_instance.relay.endpoint
}

output "rds_address" {
  description = "PostgreSQL host name: the relay database Secret's host key."
  value       = aws_db_instance.relay.address
}

output "rds_port" {
  description = "PostgreSQL port: the relay database Secret's port key."
  value       = aws_db_instance.relay.port
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
  description = "Set spec.backup.rds.snapshotPrefix to it: the backup role may only create and delete snapshots whose names start with it."
  value       = local.rds_snapshot_prefix
}
