"""netslim: turn a trained PyTorch network into a physically smaller one and measure what it costs.

The public API is importable from here; names load on first use, so `import netslim` stays cheap and the
package's layers (see ARCHITECTURE.md) never import each other through this file.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from netslim._version import __version__

_PUBLIC = {
    "compress": "netslim.workflows.api",
    "analyse": "netslim.workflows.api",
    "load_trained": "netslim.workflows.api",
    "load_data": "netslim.workflows.api",
    "load_model": "netslim.surgery.checkpoint",
    "Plan": "netslim.plan",
    "Target": "netslim.cost.targets",
    "parse_target": "netslim.cost.targets",
    "Schedule": "netslim.train.schedule",
    "list_methods": "netslim.methods",
}

__all__ = ["__version__", *_PUBLIC]

if TYPE_CHECKING:
    from netslim.cost.targets import Target, parse_target  # noqa: F401
    from netslim.methods import list_methods  # noqa: F401
    from netslim.plan import Plan  # noqa: F401
    from netslim.surgery.checkpoint import load_model  # noqa: F401
    from netslim.train.schedule import Schedule  # noqa: F401
    from netslim.workflows.api import analyse, compress, load_data, load_trained  # noqa: F401


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'netslim' has no attribute {name!r}")
    value = getattr(import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
