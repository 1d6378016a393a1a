environment        = "production"
region             = "eu-west-1"
availability_zones = ["eu-west-1a", "eu-west-1b", "eu-west-1c"]
vpc_cidr           = "10.50.0.0/16"

# One NAT gateway per AZ: an AZ outage does not take the other AZs' egress down.
single_nat_gateway = false

kubernetes_version                   = "1.34"
cluster_endpoint_public_access_cidrs = ["203.0.113.0/24"]

relay_instance_types   = ["c7i.xlarge", "c6i.xlarge"]
relay_node_count       = { min = 3, desired = 3, max = 12 }
general_instance_types = ["m7i.large", "m6i.large"]
general_node_count     = { min = 3, desired = 3, max = 6 }

db_instance_class           = "db.r7g.large"
db_multi_az                 = true
db_allocated_storage_gb     = 200
db_max_allocated_storage_gb = 2000
db_backup_retention_days    = 35
db_deletion_protection      = true

backup_bucket_name    = "acme-dchat-production-backups"
backup_retention_days = 90

domain_name     = "relay.example.com"
route53_zone_id = "Z0123456789PRODUCTION"

operator_chart_version = "0.1.0"
log_retention_days     = 365

tags = {
  team        = "platform"
  cost-center = "chat-production"
}
