# Blobs: one private bucket; browsers PUT and GET with short-lived signed URLs only.
resource "scaleway_object_bucket" "objects" {
  name   = var.bucket_name
  region = var.region
  tags   = { for t in var.tags : t => "true" }

  versioning {
    enabled = true
  }

  cors_rule {
    allowed_methods = ["GET", "PUT"]
    allowed_origins = var.blob_cors_origins
    allowed_headers = ["Content-Type", "Content-Length"]
    max_age_seconds = 3600
  }

  # Objects are kept at most a year after their last version: vibed deletes what people delete.
  lifecycle_rule {
    id      = "expire-noncurrent"
    enabled = true

    expiration {
      days = 365
    }
  }
}

resource "scaleway_object_bucket_acl" "objects" {
  bucket = scaleway_object_bucket.objects.id
  region = var.region
  acl    = "private"
}

# vibed's own credentials: object read/write in this project only, nothing else.
resource "scaleway_iam_application" "vibed" {
  name        = "vibed"
  description = "vibed replicas: blobs in ${var.bucket_name}"
  tags        = var.tags
}

resource "scaleway_iam_policy" "vibed_objects" {
  name           = "vibed-objects"
  application_id = scaleway_iam_application.vibed.id

  rule {
    project_ids          = [scaleway_object_bucket.objects.project_id]
    permission_set_names = ["ObjectStorageObjectsRead", "ObjectStorageObjectsWrite", "ObjectStorageObjectsDelete", "ObjectStorageBucketsRead"]
  }
}

resource "scaleway_iam_api_key" "vibed" {
  application_id = scaleway_iam_application.vibed.id
  description    = "vibed S3 access (Secret vibe-prod-s3)"
}

# The image registry CI pushes to: rg.<region>.scw.cloud/vibe.
resource "scaleway_registry_namespace" "vibe" {
  name      = "vibe"
  region    = var.region
  is_public = false
}
