"""CAR benchmarks: halving a layer (prune), packing the result (pack), ablation throughput (throughput) and
the cached-tail engine's gain by depth (speed_depth)."""
