"""Compression methods, each a function of a Context returning a MethodResult; importing fills the registry.

Lookups live here, not in base.py, because only this package imports every method: base.py stays free
of method imports so that methods can import it without a cycle.
"""

from typing import Any

from netslim.errors import NetslimError
from netslim.methods import car, lda, lrs, pca, peers, pfa  # noqa: F401
from netslim.methods.base import (
    REGISTRY,
    AnalysisCache,
    Context,
    MethodOptions,
    MethodResult,
    MethodSpec,
    parse_options,
    register,
)


def get_method(name: str) -> MethodSpec:
    """The registered method called `name`, or an error listing the ones there are."""
    if name not in REGISTRY:
        raise NetslimError(f"unknown method {name!r}; choose from {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def validate_options(method: str, options: dict[str, Any]) -> MethodOptions:
    """The method's declared options filled from `options`; NetslimError naming the bad key or value."""
    return parse_options(get_method(method).options, options, method)


def list_methods() -> list[MethodSpec]:
    """Every registered method, by name."""
    return [REGISTRY[name] for name in sorted(REGISTRY)]


__all__ = ["REGISTRY", "AnalysisCache", "Context", "MethodResult", "MethodSpec", "get_method", "list_methods",
           "register", "validate_options"]
