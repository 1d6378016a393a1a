# TLS certificate for the relay endpoint (used by the ALB through the Ingress annotation
# alb.ingress.kubernetes.io/certificate-arn), validated through Route 53.

resource "aws_acm_certificate" "relay" {
  domain_name       = var.domain_name
  validation_method = "DNS"

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_route53_record" "relay_validation" {
  for_each = {
    for o in aws_acm_certificate.relay.domain_validation_options : o.domain_name => {
      name   = o.resource_record_name
      type   = o.resource_record_type
      record = o.resource_record_value
    }
  }

  zone_id         = var.route53_zone_id
  name            = each.value.name
  type            = each.value.type
  records         = [each.value.record]
  ttl             = 300
  allow_overwrite = true
}

resource "aws_acm_certificate_validation" "relay" {
  certificate_arn         = aws_acm_certificate.relay.arn
  validation_record_fqdns = [for r in aws_route53_record.relay_validation : r.fqdn]
}
