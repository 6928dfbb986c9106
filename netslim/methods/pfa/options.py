"""PFA's options (`--opt key=value`): the statistics it reads, the least a layer keeps, whether attention heads
are cut, PFA-En's energy."""

from __future__ import annotations

from dataclasses import dataclass, field

from netslim.errors import NetslimError
from netslim.methods.base import MethodOptions
from netslim.probe import REDUCE_MODES

SELECTIONS = ("l1-max", "abs-max")

# PFA-En's default floor, a fraction of each layer's width. The last layers of a CIFAR network respond
# in about as many directions as there are classes, so at a tight budget one shared τ leaves them ~10
# filters: VGG-16 at 1/8 of its parameters then reaches 0.50 after a short fine-tune, against 0.83
# with this floor (benchmarks/results/pfa_floor_cpu.json). `--opt min_fraction=0` is the paper's rule.
MIN_FRACTION = 0.125


@dataclass
class PFAOptions(MethodOptions):
    """PFA-KL's options (PFA-En's add the energy and a floor by default)."""

    reduce: str = field(default="max", metadata={"help": "one value per channel and image from its response "
                                                         "map: max | mean | spatial (every position a sample)"})
    selection: str = field(default="l1-max", metadata={"help": "which correlated filter goes first: l1-max | "
                                                                "abs-max"})
    min_keep: int = field(default=1, metadata={"help": "filters every layer keeps at least"})
    min_fraction: float = field(default=0.0, metadata={"help": "fraction of each layer's width it keeps at "
                                                                "least, 0..1"})
    heads: bool = field(default=True, metadata={"help": "also keep whole heads of each attention "
                                                        "(ViT) by the spectrum of their outputs: true | false"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.reduce not in REDUCE_MODES:
            raise NetslimError(f"option reduce must be one of {', '.join(REDUCE_MODES)}, not {self.reduce!r}")
        if self.selection not in SELECTIONS:
            raise NetslimError(f"option selection must be l1-max or abs-max, not {self.selection!r}")
        if self.min_keep < 1 or not 0 <= self.min_fraction <= 1:
            raise NetslimError(f"PFA needs min_keep >= 1 and min_fraction in [0, 1], got {self.min_keep} and "
                               f"{self.min_fraction}")


@dataclass
class PFAEnOptions(PFAOptions):
    """PFA-En: the spectral energy each layer keeps (bisected instead under --target)."""

    min_fraction: float = field(default=MIN_FRACTION, metadata={"help": "fraction of each layer's width it keeps "
                                                                         "at least, 0..1 (0: the paper's rule)"})
    energy: float = field(default=0.95, metadata={"help": "fraction of each layer's spectral energy kept, in "
                                                          "(0, 1] (ignored under --target, which bisects it)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.energy <= 1:
            raise NetslimError(f"option energy must be in (0, 1], not {self.energy}")
