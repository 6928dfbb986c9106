"""Low-rank + sparse decomposition (GreBdec); importing registers the method."""

from netslim.methods.lrs import core  # noqa: F401
from netslim.methods.lrs.moments import original_moments
from netslim.methods.lrs.solver import decompose, weighted_error

__all__ = ["decompose", "original_moments", "weighted_error"]
