# Kapsule cluster vibe-prod: the Helm chart (infra/helm/vibe) deploys vibed and CouchDB here.
resource "scaleway_k8s_cluster" "prod" {
  name                        = "vibe-prod"
  version                     = var.kubernetes_version
  cni                         = "cilium"
  region                      = var.region
  private_network_id          = scaleway_vpc_private_network.vibe.id
  delete_additional_resources = false
  tags                        = var.tags

  auto_upgrade {
    enable                        = true
    maintenance_window_start_hour = 3
    maintenance_window_day        = "sunday"
  }

  autoscaler_config {
    scale_down_delay_after_add = "10m"
    balance_similar_node_groups = true
  }
}

resource "scaleway_k8s_pool" "default" {
  cluster_id         = scaleway_k8s_cluster.prod.id
  name               = "vibe-default"
  node_type          = var.node_type
  size               = var.node_min_size
  min_size           = var.node_min_size
  max_size           = var.node_max_size
  autoscaling        = true
  autohealing        = true
  public_ip_disabled = true
  region             = var.region
  tags               = var.tags

  # Nodes without public IPs need the gateway's NAT before they can join.
  depends_on = [scaleway_vpc_gateway_network.vibe]
}
