"""Compression methods, each a function of a Context returning a MethodResult; importing fills the registry."""

from netslim.methods import car, lda, lrs, pca, peers, pfa  # noqa: F401
from netslim.methods.base import REGISTRY, Context, MethodSpec, get_method, register

__all__ = ["REGISTRY", "Context", "MethodSpec", "get_method", "register"]
