"""PFA benchmarks: domain adaptation (domain) and the per-layer floor (floor)."""
