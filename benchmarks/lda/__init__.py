"""LDA benchmarks: task-dependent deep LDA against torch-pruning L1 at the same size (task)."""
