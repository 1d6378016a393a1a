data "aws_caller_identity" "current" {}
data "aws_partition" "current" {}

locals {
  name       = "dchat-${var.environment}"
  account_id = data.aws_caller_identity.current.account_id
  partition  = data.aws_partition.current.partition

  tags = merge(var.tags, {
    "app.kubernetes.io/part-of" = "dchat"
    environment                 = var.environment
    managed-by                  = "terraform"
  })

  # Three AZs, each with a public (/20 -> load balancers, NAT) and a private (/18 -> nodes,
  # pods with the VPC CNI) subnet, plus a small database subnet.
  public_subnets   = [for i in range(3) : cidrsubnet(var.vpc_cidr, 4, i)]
  private_subnets  = [for i in range(3) : cidrsubnet(var.vpc_cidr, 2, i + 1)]
  database_subnets = [for i in range(3) : cidrsubnet(var.vpc_cidr, 6, i + 12)]

  # The relays' ServiceAccounts (<cluster>-relay) that run backup Jobs.
  relay_service_accounts = [for sa in var.relay_service_accounts : "system:serviceaccount:${sa}"]
  rds_snapshot_prefix    = "${local.name}-relay"
}
