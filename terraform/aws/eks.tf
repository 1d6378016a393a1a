# EKS with two managed node groups: "relay" (compute optimized, tainted so only relay pods
# land there) and "general" (operator, add-ons, monitoring). Secrets are envelope-encrypted
# with a KMS key the module creates; control plane logs go to CloudWatch.
module "eks" {
  # checkov:skip=CKV_TF_1:Registry modules cannot be referenced by commit hash; they are pinned by a version constraint and resolved once into .terraform.lock.hcl / the module cache during init.
  source  = "terraform-aws-modules/eks/aws"
  version = "~> 21.0"

  name               = local.name
  kubernetes_version = var.kubernetes_version

  vpc_id     = module.vpc.vpc_id
  subnet_ids = module.vpc.private_subnets

  endpoint_private_access      = true
  endpoint_public_access       = length(var.cluster_endpoint_public_access_cidrs) > 0
  endpoint_public_access_cidrs = var.cluster_endpoint_public_access_cidrs

  enabled_log_types                      = ["api", "audit", "authenticator", "controllerManager", "scheduler"]
  cloudwatch_log_group_retention_in_days = var.log_retention_days
  cloudwatch_log_group_kms_key_id        = aws_kms_key.logs.arn

  # IRSA: the OIDC provider the operator's and the controllers' roles trust.
  enable_irsa = true

  enable_cluster_creator_admin_permissions = true

  # Core add-ons, managed by EKS and kept at the version matching the control plane.
  addons = {
    vpc-cni = {
      before_compute = true
      most_recent    = true
    }
    kube-proxy = {
      most_recent = true
    }
    coredns = {
      most_recent = true
    }
    eks-pod-identity-agent = {
      before_compute = true
      most_recent    = true
    }
    aws-ebs-csi-driver = {
      most_recent              = true
      service_account_role_arn = module.ebs_csi_irsa.iam_role_arn
    }
  }

  eks_managed_node_groups = {
    relay = {
      instance_types = var.relay_instance_types
      ami_type       = "AL2023_x86_64_STANDARD"
      min_size       = var.relay_node_count.min
      max_size       = var.relay_node_count.max
      desired_size   = var.relay_node_count.desired
      labels = {
        "dchat.network/pool" = "relay"
      }
      taints = {
        relay = {
          key    = "dchat.network/pool"
          value  = "relay"
          effect = "NO_SCHEDULE"
        }
      }
      block_device_mappings = {
        xvda = {
          device_name = "/dev/xvda"
          ebs = {
            volume_size           = 50
            volume_type           = "gp3"
            encrypted             = true
            delete_on_termination = true
          }
        }
      }
      metadata_options = {
        http_endpoint               = "enabled"
        http_tokens                 = "required"
        http_put_response_hop_limit = 1
      }
    }
    general = {
      instance_types = var.general_instance_types
      ami_type       = "AL2023_x86_64_STANDARD"
      min_size       = var.general_node_count.min
      max_size       = var.general_node_count.max
      desired_size   = var.general_node_count.desired
      labels = {
        "dchat.network/pool" = "general"
      }
      block_device_mappings = {
        xvda = {
          device_name = "/dev/xvda"
          ebs = {
            volume_size           = 50
            volume_type           = "gp3"
            encrypted             = true
            delete_on_termination = true
          }
        }
      }
      metadata_options = {
        http_endpoint               = "enabled"
        http_tokens                 = "required"
        http_put_response_hop_limit = 1
      }
    }
  }
}

# Encrypted gp3 volumes for relay data (spec.storage.storageClassName: gp3). Retain: deleting a
# PVC by mistake must not delete undelivered messages.
resource "kubernetes_storage_class_v1" "gp3" {
  metadata {
    name = "gp3"
    annotations = {
      "storageclass.kubernetes.io/is-default-class" = "true"
    }
  }
  storage_provisioner    = "ebs.csi.aws.com"
  reclaim_policy         = "Retain"
  volume_binding_mode    = "WaitForFirstConsumer"
  allow_volume_expansion = true
  parameters = {
    type      = "gp3"
    encrypted = "true"
  }

  depends_on = [module.eks]
}
