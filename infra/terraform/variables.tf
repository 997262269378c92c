variable "region" {
  description = "Scaleway region of every regional resource (VPC, cluster, bucket)."
  type        = string
  default     = "fr-par"
}

variable "zone" {
  description = "Scaleway zone of the zonal resources (public gateway, load balancer)."
  type        = string
  default     = "fr-par-1"
}

variable "domain" {
  description = "Public host name vibed answers to (DNS points at the load balancer's IP)."
  type        = string
  default     = "vibe.cloud"
}

variable "private_subnet" {
  description = "IPv4 subnet of the private network the nodes and the load balancer share."
  type        = string
  default     = "172.16.32.0/22"
}

variable "gateway_type" {
  description = "Public gateway offer (NAT for the nodes, which have no public IP): VPC-GW-S, VPC-GW-M..."
  type        = string
  default     = "VPC-GW-S"
}

variable "kubernetes_version" {
  description = "Kubernetes minor version of the Kapsule cluster (patch upgrades are automatic)."
  type        = string
  default     = "1.33"
}

variable "node_type" {
  description = "Instance type of the cluster's nodes (vibed replicas and CouchDB pods)."
  type        = string
  default     = "PRO2-S"
}

variable "node_min_size" {
  description = "Fewest nodes the autoscaler keeps (3: one CouchDB pod per node)."
  type        = number
  default     = 3
}

variable "node_max_size" {
  description = "Most nodes the autoscaler may add."
  type        = number
  default     = 6
}

variable "lb_type" {
  description = "Load balancer offer in front of the ingress controller: LB-S, LB-GP-M..."
  type        = string
  default     = "LB-S"
}

variable "bucket_name" {
  description = "Object Storage bucket holding every identity's blobs."
  type        = string
  default     = "vibe-objects"
}

variable "blob_cors_origins" {
  description = "Origins whose pages may PUT and GET blobs with signed URLs (the site itself and app origins)."
  type        = list(string)
  default     = ["https://vibe.cloud"]
}

variable "tags" {
  description = "Tags put on every resource."
  type        = list(string)
  default     = ["vibe", "production"]
}
