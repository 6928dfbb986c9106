"""CAR: greedy pruning by classification accuracy reduction; importing registers the method."""

from netslim.methods.car import core  # noqa: F401
from netslim.methods.car.core import eval_set
from netslim.methods.car.engine import AblationEngine
from netslim.methods.car.greedy import GreedyRun, greedy
from netslim.methods.car.heads import HeadEngine
from netslim.methods.car.options import CAROptions

__all__ = ["AblationEngine", "CAROptions", "GreedyRun", "HeadEngine", "eval_set", "greedy"]
