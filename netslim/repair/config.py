"""How a cut network is repaired before any training: the `--repair` choice and its calibration budget."""

from __future__ import annotations

from dataclasses import dataclass

from netslim.errors import NetslimError

MODES = ("none", "bn", "lsq")
TARGETS = ("block", "layer")
SELECTIONS = ("method", "thinet")


@dataclass(frozen=True)
class Repair:
    """none: the cut weights as they are; bn: BatchNorm re-estimation (each layer scaled back to its trained
    variance); lsq: least-squares refit of every layer whose inputs were cut, then the BatchNorm step.

    The refit fits on `images` training images and measures each layer's error on `holdout` others (a refit
    that does not lower it there is undone); `positions` output positions are sampled per image. `target`:
    "block" fits a layer that feeds a residual sum to the sum, "layer" every layer to its own output. The BN
    step after a refit is kept only if it does not lower accuracy on the `holdout` images. `select`: which
    channels a cut keeps, the method's own choice or ThiNet's (netslim.repair.select) at the method's widths."""

    mode: str = "lsq"
    images: int = 2000
    holdout: int = 256
    positions: int = 16
    ridge: float = 1e-4
    target: str = "block"
    select: str = "method"

    def __post_init__(self) -> None:  # refused when made, before any analysis runs
        if self.mode not in MODES:
            raise NetslimError(f"--repair must be one of {', '.join(MODES)}, not {self.mode!r}")
        if self.target not in TARGETS:
            raise NetslimError(f"the refit target must be one of {', '.join(TARGETS)}, not {self.target!r}")
        if self.select not in SELECTIONS:
            raise NetslimError(f"--select must be one of {', '.join(SELECTIONS)}, not {self.select!r}")
        if self.images < 1 or self.holdout < 0 or self.positions < 1 or self.ridge < 0:
            raise NetslimError(f"repair needs images >= 1, holdout >= 0, positions >= 1 and ridge >= 0; got "
                               f"{self.images}, {self.holdout}, {self.positions}, {self.ridge}")
