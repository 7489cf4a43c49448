"""Model loading: the tiny offline pipelines, real checkpoints, and the allowlist."""
