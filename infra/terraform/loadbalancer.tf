# vibe-lb: the public entry. The ingress controller's Service adopts it with the annotation
#   service.beta.kubernetes.io/scw-loadbalancer-id: <output lb_id>
resource "scaleway_lb_ip" "vibe" {
  zone = var.zone
  tags = var.tags
}

resource "scaleway_lb" "vibe" {
  name   = "vibe-lb"
  type   = var.lb_type
  zone   = var.zone
  ip_ids = [scaleway_lb_ip.vibe.id]
  tags   = var.tags

  private_network {
    private_network_id = scaleway_vpc_private_network.vibe.id
  }
}
