"""CAR: greedy pruning by classification accuracy reduction; importing registers the method."""

from netslim.methods.car import core  # noqa: F401
