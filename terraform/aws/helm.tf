# In-cluster releases: the AWS Load Balancer Controller (for the relay Ingress/ALB) and the
# dchat operator (it makes no AWS call: backups run as the relays' role).

resource "helm_release" "aws_load_balancer_controller" {
  name       = "aws-load-balancer-controller"
  namespace  = "kube-system"
  repository = "https://aws.github.io/eks-charts"
  chart      = "aws-load-balancer-controller"
  version    = var.alb_controller_chart_version

  values = [yamlencode({
    clusterName = module.eks.cluster_name
    region      = var.region
    vpcId       = module.vpc.vpc_id
    serviceAccount = {
      name = "aws-load-balancer-controller"
      annotations = {
        "eks.amazonaws.com/role-arn" = module.alb_controller_irsa.iam_role_arn
      }
    }
  })]

  depends_on = [module.eks]
}

resource "helm_release" "dchat_operator" {
  name             = "dchat-operator"
  namespace        = var.operator_namespace
  create_namespace = true
  repository       = var.operator_chart_repository
  chart            = "dchat-operator"
  version          = var.operator_chart_version
  atomic           = true
  wait             = true
  timeout          = 600

  values = [yamlencode({
    operator = {
      extraEnv = [{ name = "AWS_REGION", value = var.region }]
    }
    nodeSelector = { "dchat.network/pool" = "general" }
  })]

  depends_on = [module.eks, helm_release.aws_load_balancer_controller]
}
