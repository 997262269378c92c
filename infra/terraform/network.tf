# The VPC, its private network (nodes and load balancer), and a public gateway that gives the
# nodes outbound internet through NAT without public IPs of their own.
resource "scaleway_vpc" "vibe" {
  name   = "vibe-vpc"
  region = var.region
  tags   = var.tags
}

resource "scaleway_vpc_private_network" "vibe" {
  name   = "vibe-private"
  vpc_id = scaleway_vpc.vibe.id
  region = var.region
  tags   = var.tags

  ipv4_subnet {
    subnet = var.private_subnet
  }
}

resource "scaleway_vpc_public_gateway_ip" "vibe" {
  zone = var.zone
  tags = var.tags
}

resource "scaleway_vpc_public_gateway" "vibe" {
  name            = "vibe-gateway"
  type            = var.gateway_type
  zone            = var.zone
  ip_id           = scaleway_vpc_public_gateway_ip.vibe.id
  bastion_enabled = false
  tags            = var.tags
}

# NAT: the gateway masquerades the private network's traffic and is its default route.
resource "scaleway_vpc_gateway_network" "vibe" {
  gateway_id         = scaleway_vpc_public_gateway.vibe.id
  private_network_id = scaleway_vpc_private_network.vibe.id
  enable_masquerade  = true
  zone               = var.zone

  ipam_config {
    push_default_route = true
  }
}
