"""`netslim bench` benchmarks: the statistics pass shared across methods (sharing)."""
