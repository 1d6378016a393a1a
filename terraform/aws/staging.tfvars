environment        = "staging"
region             = "eu-west-1"
availability_zones = ["eu-west-1a", "eu-west-1b", "eu-west-1c"]
vpc_cidr           = "10.40.0.0/16"

# One NAT gateway for the whole VPC: staging accepts losing egress with one AZ.
single_nat_gateway = true

kubernetes_version                   = "1.34"
cluster_endpoint_public_access_cidrs = ["203.0.113.0/24"]

relay_instance_types   = ["c7i.large"]
relay_node_count       = { min = 2, desired = 2, max = 4 }
general_instance_types = ["m7i.large"]
general_node_count     = { min = 2, desired = 2, max = 3 }

db_instance_class           = "db.t4g.medium"
db_multi_az                 = false
db_allocated_storage_gb     = 20
db_max_allocated_storage_gb = 100
db_backup_retention_days    = 7
db_deletion_protection      = false

backup_bucket_name    = "acme-dchat-staging-backups"
backup_retention_days = 30

domain_name     = "relay.staging.example.com"
route53_zone_id = "Z0123456789STAGING"

operator_chart_version = "0.1.0"
log_retention_days     = 90

tags = {
  team        = "platform"
  cost-center = "chat-staging"
}
