"""Low-rank + sparse benchmarks: per layer at equal storage (layers) and the whole network (network)."""
