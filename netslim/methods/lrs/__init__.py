"""Low-rank + sparse decomposition (GreBdec); importing registers the method."""

from netslim.methods.lrs import core  # noqa: F401
