terraform {
  required_version = ">= 1.6.0"

  required_providers {
    scaleway = {
      source  = "scaleway/scaleway"
      version = "~> 2.55"
    }
  }

  # State in a Scaleway bucket of its own (create it once by hand, with versioning on):
  # terraform init -backend-config="bucket=vibe-terraform-state" -backend-config="key=prod.tfstate"
  backend "s3" {
    region                      = "fr-par"
    endpoints                   = { s3 = "https://s3.fr-par.scw.cloud" }
    skip_credentials_validation = true
    skip_region_validation      = true
    skip_requesting_account_id  = true
  }
}

# Credentials from SCW_ACCESS_KEY / SCW_SECRET_KEY / SCW_DEFAULT_PROJECT_ID (never in files).
provider "scaleway" {
  region = var.region
  zone   = var.zone
}
