output "web_url" {
  description = "Where people open Vibe Cloud (pages are served by vibed itself)."
  value       = "https://${var.domain}"
}

output "api_url" {
  description = "Base URL of the HTTP and WebSocket API (the same origin as the pages)."
  value       = "https://${var.domain}"
}

output "lb_ip" {
  description = "Public IP of vibe-lb: the A record of the domain."
  value       = scaleway_lb_ip.vibe.ip_address
}

output "lb_id" {
  description = "ID of vibe-lb, for the ingress controller Service's scw-loadbalancer-id annotation."
  value       = scaleway_lb.vibe.id
}

output "cluster_id" {
  description = "ID of the vibe-prod Kapsule cluster (scw k8s kubeconfig install <id>)."
  value       = scaleway_k8s_cluster.prod.id
}

output "bucket_endpoint" {
  description = "S3 endpoint and bucket for the chart's s3.endpoint and s3.bucket values."
  value       = "https://s3.${var.region}.scw.cloud/${scaleway_object_bucket.objects.name}"
}

output "registry_endpoint" {
  description = "Container registry CI pushes the vibed image to."
  value       = scaleway_registry_namespace.vibe.endpoint
}

output "vibed_s3_access_key" {
  description = "Access key of vibed's IAM application (AWS_ACCESS_KEY_ID of the Secret vibe-prod-s3)."
  value       = scaleway_iam_api_key.vibed.access_key
}

output "vibed_s3_secret_key" {
  description = "Its secret key (AWS_SECRET_ACCESS_KEY): terraform output -raw vibed_s3_secret_key."
  value       = scaleway_iam_api_key.vibed.secret_key
  sensitive   = true
}
