"""Speed benchmarks: export runtimes, latency targets, width rounding, width staircase, probe overhead."""
