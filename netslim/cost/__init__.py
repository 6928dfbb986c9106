"""What a network costs, so that methods can be held to a budget.

size: parameters, MACs/FLOPs, stored bytes (also of Plans, on the meta device). timing: the one
timing engine. units + latency_table: latency predicted per layer from an on-disk table per device.
targets: `--target` parsing and the searches that meet one
(a latency target is timed on the runtime it names: netslim.runtime).
"""
