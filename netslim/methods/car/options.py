"""CAR's options (`--opt key=value`): which layers and heads, how accuracy is measured, how often the greedy loop
re-ranks."""

from __future__ import annotations

from dataclasses import dataclass, field

from netslim.errors import NetslimError
from netslim.methods.base import MethodOptions

PRECISIONS = ("fp32", "bf16")


@dataclass
class CAROptions(MethodOptions):
    """Greedy CAR's knobs; `batch` and `masks_per_pass` default by device (larger on CUDA)."""

    layers: list[str] | None = field(default=None, metadata={"help": "layers (or attentions) to prune, "
                                                                      "comma-separated (default all)"})
    heads: bool = field(default=True, metadata={"help": "also remove whole heads of each attention "
                                                        "(ViT) by their CAR: true | false"})
    eval_size: int = field(default=2000, metadata={"help": "training images accuracy is measured on"})
    per_step: int = field(default=1, metadata={"help": "re-rank every K removals (1: recompute CAR after every "
                                                       "removal, the paper's reading)"})
    adaptive: bool = field(default=True, metadata={"help": "cut a per_step block short at a removal costing "
                                                           "more than its CAR"})
    keep_fraction: float = field(default=0.5, metadata={"help": "fraction of each chosen layer kept, in (0, 1] "
                                                                "(without --target)"})
    max_drop: float | None = field(default=None, metadata={"help": "stop a layer before eval accuracy falls more "
                                                                   "than this below the start"})
    classwise: bool = field(default=False, metadata={"help": "per-class accuracy change per filter (heat map "
                                                             "in the report)"})
    min_keep: int = field(default=1, metadata={"help": "filters every chosen layer keeps at least"})
    seed: int = field(default=0, metadata={"help": "seed of the evaluation subset"})
    batch: int | None = field(default=None, metadata={"help": "forward batch of the evaluations (default 2048 on "
                                                              "CUDA, 256 on CPU)"})
    masks_per_pass: int | None = field(default=None, metadata={"help": "filter masks evaluated per pass (default "
                                                                       "64 on CUDA, 32 on CPU)"})
    fast: bool = field(default=True, metadata={"help": "cached layer input and batched masks (false: naive "
                                                       "full-network evaluation)"})
    precision: str = field(default="fp32", metadata={"help": "fp32 | bf16 (autocast: faster, approximate)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layers is not None and [n for n in self.layers if n.strip()] in ([], ["all"]):
            self.layers = None  # "" and "all" mean every prunable layer
        if self.eval_size < 1:
            raise NetslimError(f"option eval_size must be positive, got {self.eval_size}")
        if self.per_step < 1:
            raise NetslimError(f"option per_step must be at least 1, got {self.per_step}")
        if not 0 < self.keep_fraction <= 1:
            raise NetslimError(f"option keep_fraction must be in (0, 1], not {self.keep_fraction}")
        if self.min_keep < 1:
            raise NetslimError(f"option min_keep must be at least 1, not {self.min_keep}")
        if any(v is not None and v < 1 for v in (self.batch, self.masks_per_pass)):
            raise NetslimError("options batch and masks_per_pass must be at least 1")
        if self.precision not in PRECISIONS:
            raise NetslimError(f"option precision must be fp32 or bf16, not {self.precision!r}")
