"""PCA benchmarks: the PCA-designed network trained from scratch against the original (design)."""
