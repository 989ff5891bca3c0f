"""Training: the Ray driver (`driver`), the per-worker loop (`loop`), DeepSpeed set-up and the metrics log."""
