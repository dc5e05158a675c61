"""Baselines: anomaly synthesis in pixel space (MediCLIP's tasks and a plain-noise heuristic)."""
