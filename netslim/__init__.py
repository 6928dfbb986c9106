"""netslim: turn a trained PyTorch network into a physically smaller one that keeps its accuracy."""

from netslim._version import __version__

__all__ = ["__version__"]
