"""MLflow: logger construction with fail-fast checks, run records, and logging that never kills training."""
