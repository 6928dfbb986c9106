"""Principal Filter Analysis (PFA-En, PFA-KL); importing registers the method."""

from netslim.methods.pfa import core  # noqa: F401
