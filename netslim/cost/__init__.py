"""What a network costs: parameters, MACs/FLOPs, stored bytes, measured latency; budgets and targets."""
