"""Statistics probe: where each layer's response appears and streaming moments of it."""

from netslim.probe.collect import REDUCE_MODES, collect, reduce_response
from netslim.probe.heads import head_outputs, head_stats
from netslim.probe.points import ResponsePoint, response_modules
from netslim.probe.stats import LayerStats, all_reduce_stats, stats_from_tensors, stats_to_tensors

__all__ = [
    "REDUCE_MODES",
    "LayerStats",
    "ResponsePoint",
    "all_reduce_stats",
    "collect",
    "head_outputs",
    "head_stats",
    "reduce_response",
    "response_modules",
    "stats_from_tensors",
    "stats_to_tensors",
]
