"""Ray-side launching: local/remote Ray Train runs, Ray Jobs submission, local S3 for demos."""
