"""What a user reads: markdown tables, PNG plots, the run directory."""
