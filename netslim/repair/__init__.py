"""Repair after a cut: refit the consumers of cut layers to the original network's outputs.

`lsq_refit` (least squares per layer, He et al. 2017 / ThiNet) and the cheaper `compensate_bias`
(mean shift into the bias) both work in place on the cut network, in forward order, from streamed
statistics, and return a `RefitReport`. An attention that lost heads counts as a consumer too: its out_proj
is refitted from the kept heads' recomputed outputs (netslim.repair.attention). BatchNorm re-estimation
(netslim.train.bn) follows either.
`thinet_select` re-chooses which channels a Plan keeps (ThiNet's greedy), before the cut.
"""

from netslim.repair.bias import compensate_bias
from netslim.repair.capture import patches, sample_positions
from netslim.repair.config import MODES, SELECTIONS, Repair
from netslim.repair.layers import Job, find_jobs, match_rows, plan_outputs
from netslim.repair.lsq import Moments, accumulate, lsq_refit, solve
from netslim.repair.report import LayerRepair, RefitReport
from netslim.repair.select import thinet_select

__all__ = ["MODES", "SELECTIONS", "Repair", "Job", "LayerRepair", "Moments", "RefitReport", "accumulate",
           "compensate_bias", "find_jobs", "lsq_refit", "match_rows", "patches", "plan_outputs",
           "sample_positions", "solve", "thinet_select"]
