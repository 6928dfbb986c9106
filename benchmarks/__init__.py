"""Benchmarks: one folder per method plus speed/ and bench/; run each as a module from the repository root."""
