variable "environment" {
  description = "Deployment environment; selects sizing defaults and names every resource dchat-<environment>."
  type        = string

  validation {
    condition     = contains(["staging", "production"], var.environment)
    error_message = "environment must be \"staging\" or \"production\"."
  }
}

variable "region" {
  description = "AWS region for every resource, e.g. eu-west-1."
  type        = string

  validation {
    condition     = can(regex("^[a-z]{2}(-gov)?-[a-z]+-[0-9]$", var.region))
    error_message = "region must look like eu-west-1."
  }
}

variable "availability_zones" {
  description = "Exactly three availability zones in the region for subnets, nodes and RDS Multi-AZ."
  type        = list(string)

  validation {
    condition     = length(var.availability_zones) == 3 && length(distinct(var.availability_zones)) == 3
    error_message = "availability_zones must list three distinct zones."
  }
}

variable "vpc_cidr" {
  description = "IPv4 CIDR of the VPC; a /16 leaves room for pods with the VPC CNI."
  type        = string
  default     = "10.40.0.0/16"

  validation {
    condition     = can(cidrhost(var.vpc_cidr, 0)) && tonumber(split("/", var.vpc_cidr)[1]) <= 16
    error_message = "vpc_cidr must be a valid IPv4 CIDR of size /16 or larger."
  }
}

variable "single_nat_gateway" {
  description = "One NAT gateway for all AZs (cheaper, for staging) instead of one per AZ (production)."
  type        = bool
  default     = false
}

variable "kubernetes_version" {
  description = "EKS Kubernetes minor version. The operator supports 1.33 and newer."
  type        = string
  default     = "1.34"

  validation {
    condition     = can(regex("^1\\.(3[3-9])$", var.kubernetes_version))
    error_message = "kubernetes_version must be 1.33 or newer, as MAJOR.MINOR (e.g. 1.34)."
  }
}

variable "cluster_endpoint_public_access_cidrs" {
  description = "CIDRs allowed to reach the EKS API endpoint publicly (CI runners, VPN). Empty makes the endpoint private only."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for c in var.cluster_endpoint_public_access_cidrs : can(cidrhost(c, 0)) && c != "0.0.0.0/0"])
    error_message = "cluster_endpoint_public_access_cidrs must be valid CIDRs and must not be 0.0.0.0/0."
  }
}

variable "relay_instance_types" {
  description = "Compute-optimized instance types for the relay node group (WebSocket fan-out is CPU bound)."
  type        = list(string)
  default     = ["c7i.xlarge", "c6i.xlarge"]

  validation {
    condition     = length(var.relay_instance_types) > 0 && alltrue([for t in var.relay_instance_types : can(regex("^c[0-9]+[a-z]*\\.", t))])
    error_message = "relay_instance_types must be compute-optimized (c-family) instance types."
  }
}

variable "relay_node_count" {
  description = "Relay node group size as {min, desired, max}."
  type = object({
    min     = number
    desired = number
    max     = number
  })
  default = { min = 3, desired = 3, max = 12 }

  validation {
    condition     = var.relay_node_count.min >= 1 && var.relay_node_count.min <= var.relay_node_count.desired && var.relay_node_count.desired <= var.relay_node_count.max
    error_message = "relay_node_count needs 1 <= min <= desired <= max."
  }
}

variable "general_instance_types" {
  description = "Instance types for the general node group (operator, add-ons, monitoring)."
  type        = list(string)
  default     = ["m7i.large", "m6i.large"]

  validation {
    condition     = length(var.general_instance_types) > 0
    error_message = "general_instance_types must not be empty."
  }
}

variable "general_node_count" {
  description = "General node group size as {min, desired, max}."
  type = object({
    min     = number
    desired = number
    max     = number
  })
  default = { min = 2, desired = 3, max = 6 }

  validation {
    condition     = var.general_node_count.min >= 1 && var.general_node_count.min <= var.general_node_count.desired && var.general_node_count.desired <= var.general_node_count.max
    error_message = "general_node_count needs 1 <= min <= desired <= max."
  }
}

variable "db_instance_class" {
  description = "RDS instance class for PostgreSQL, e.g. db.r7g.large."
  type        = string
  default     = "db.r7g.large"

  validation {
    condition     = can(regex("^db\\.[a-z0-9]+\\.[a-z0-9]+$", var.db_instance_class))
    error_message = "db_instance_class must look like db.r7g.large."
  }
}

variable "db_engine_version" {
  description = "PostgreSQL major version for RDS (minor versions are upgraded automatically)."
  type        = string
  default     = "17"

  validation {
    condition     = contains(["16", "17"], var.db_engine_version)
    error_message = "db_engine_version must be 16 or 17."
  }
}

variable "db_multi_az" {
  description = "Run RDS Multi-AZ with a synchronous standby (required for production)."
  type        = bool
  default     = true

  validation {
    condition     = var.db_multi_az || var.environment != "production"
    error_message = "production requires db_multi_az = true."
  }
}

variable "db_allocated_storage_gb" {
  description = "Initial RDS storage in GiB (gp3)."
  type        = number
  default     = 100

  validation {
    condition     = var.db_allocated_storage_gb >= 20 && var.db_allocated_storage_gb <= 65536
    error_message = "db_allocated_storage_gb must be between 20 and 65536."
  }
}

variable "db_max_allocated_storage_gb" {
  description = "Upper bound for RDS storage autoscaling in GiB; must exceed the initial size."
  type        = number
  default     = 1000

  validation {
    condition     = var.db_max_allocated_storage_gb > var.db_allocated_storage_gb
    error_message = "db_max_allocated_storage_gb must be larger than db_allocated_storage_gb (storage autoscaling)."
  }
}

variable "db_backup_retention_days" {
  description = "Days RDS keeps automated backups (point-in-time recovery window)."
  type        = number
  default     = 14

  validation {
    condition     = var.db_backup_retention_days >= 7 && var.db_backup_retention_days <= 35
    error_message = "db_backup_retention_days must be between 7 and 35."
  }
}

variable "db_deletion_protection" {
  description = "Refuse to delete the RDS instance until this is turned off."
  type        = bool
  default     = true
}

variable "backup_bucket_name" {
  description = "Globally unique name of the S3 bucket for relay backups."
  type        = string

  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", var.backup_bucket_name))
    error_message = "backup_bucket_name must be a valid S3 bucket name."
  }
}

variable "backup_retention_days" {
  description = "Days after which backup objects expire (keep in line with spec.backup.retention)."
  type        = number
  default     = 90

  validation {
    condition     = var.backup_retention_days >= 7
    error_message = "backup_retention_days must be at least 7."
  }
}

variable "domain_name" {
  description = "Public DNS name of the relay endpoint (ACM certificate and Ingress host), e.g. relay.example.com."
  type        = string

  validation {
    condition     = can(regex("^([a-z0-9]([a-z0-9-]*[a-z0-9])?\\.)+[a-z]{2,}$", var.domain_name))
    error_message = "domain_name must be a DNS name such as relay.example.com."
  }
}

variable "route53_zone_id" {
  description = "Route 53 hosted zone that holds domain_name; ACM validation records are written there."
  type        = string

  validation {
    condition     = can(regex("^Z[A-Z0-9]+$", var.route53_zone_id))
    error_message = "route53_zone_id must be a Route 53 zone id (Z...)."
  }
}

variable "relay_service_accounts" {
  description = "ServiceAccounts (namespace:name) of the DchatClusters with spec.backup: <namespace>:<cluster>-relay. They may assume the backup role (IRSA)."
  type        = list(string)
  default     = ["dchat:dchat-relay"]

  validation {
    condition     = length(var.relay_service_accounts) > 0 && alltrue([for sa in var.relay_service_accounts : can(regex("^[a-z0-9]([-a-z0-9]*[a-z0-9])?:[a-z0-9]([-a-z0-9]*[a-z0-9])?$", sa))])
    error_message = "relay_service_accounts must be namespace:name pairs of DNS labels."
  }
}

variable "operator_namespace" {
  description = "Namespace of the dchat-operator Helm release."
  type        = string
  default     = "dchat-system"

  validation {
    condition     = can(regex("^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", var.operator_namespace))
    error_message = "operator_namespace must be a DNS label."
  }
}

variable "operator_chart_version" {
  description = "dchat-operator chart version to install (same as the operator release, e.g. 0.1.0)."
  type        = string

  validation {
    condition     = can(regex("^[0-9]+\\.[0-9]+\\.[0-9]+(-[0-9A-Za-z.-]+)?$", var.operator_chart_version))
    error_message = "operator_chart_version must be SemVer without a leading v."
  }
}

variable "operator_chart_repository" {
  description = "OCI repository holding the dchat-operator chart."
  type        = string
  default     = "oci://ghcr.io/dchat/charts"
}

variable "alb_controller_chart_version" {
  description = "aws-load-balancer-controller Helm chart version."
  type        = string
  default     = "1.14.0"
}

variable "log_retention_days" {
  description = "CloudWatch retention for EKS control plane, VPC flow and RDS logs."
  type        = number
  default     = 365

  validation {
    condition     = contains([1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922, 3288, 3653], var.log_retention_days)
    error_message = "log_retention_days must be a value CloudWatch Logs accepts."
  }
}

variable "tags" {
  description = "Extra tags for every resource (cost center, owner)."
  type        = map(string)
  default     = {}
}
