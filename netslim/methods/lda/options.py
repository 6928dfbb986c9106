"""The deep LDA loop's options (`--opt key=value`): stopping rule, threshold schedule, fine-tuning rounds.

Declared here rather than in loop.py so that core.py can register the method with them without importing
the loop (and its training stack) at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from netslim.errors import NetslimError
from netslim.methods.base import Context, MethodOptions, parse_options


def _opt(default: Any, text: str) -> Any:
    return field(default=default, metadata={"help": text})


@dataclass
class LoopOptions(MethodOptions):
    """Knobs of the loop; the loop ignores round_to (its widths come from the utility threshold)."""

    min_accuracy: float | None = _opt(None, "keep pruning while validation accuracy stays >= this, in (0, 1]")
    max_drop: float = _opt(0.02, "without min_accuracy or --target: floor = unpruned validation accuracy minus "
                                 "this")
    eta_start: float = _opt(0.1, "first utility threshold η (times the group's utility std), > 0")
    eta_step: float = _opt(0.1, "η added every iteration, >= 0")
    max_iters: int = _opt(10, "iterations at most, >= 1")
    threshold_origin: str = _opt("auto", "where η·std is measured from: zero (the paper: rectified units, whose "
                                         "useless ones trace to ~0) | min (the group's smallest non-zero utility: "
                                         "smooth activations such as GELU, whose every unit traces to well above 0) "
                                         "| auto (min for units behind a smooth activation and for heads, else zero)")
    fisher: str = _opt("diag", "diag | eig (full generalised eigenproblem)")
    mprime: int = _opt(0, "fixed M′ selected neurons (0: choose on validation data)")
    mprime_tol: float = _opt(0.01, "M′ is the fewest neurons within this accuracy of all of them")
    trace_images: int = _opt(10, "images per class the utility is traced back on, >= 1")
    min_keep: int = _opt(1, "channels every layer keeps at least")
    heads: bool = _opt(True, "also cut whole heads of each attention (ViT) by their traced utility, "
                             "at least one kept per attention: true | false")
    head_tokens: str = _opt("max", "a head feature's utility over tokens: max (as over positions) | cls (the "
                                   "class token's, the first)")
    select: str = _opt("smallest", "smallest | best (highest validation accuracy at or above the floor)")
    patience: int = _opt(0, "iterations in a row below the floor tolerated before stopping (never selected)")
    val_images: int = _opt(0, "validation images used (0: all)")
    ft_epochs: int = _opt(1, "fine-tuning epochs per round")
    ft_lr: float = _opt(0.01, "fine-tuning learning rate")
    ft_batch: int = _opt(128, "fine-tuning batch size")
    ft_images: int = _opt(0, "training images per fine-tuning round (0: all)")
    ft_schedule: str = _opt("onecycle", "fine-tuning schedule: onecycle | cosine | constant")
    ft_weight_decay: float = _opt(5e-4, "fine-tuning weight decay")
    ft_distill: float = _opt(0.0, "weight of the unpruned network's softened outputs in each round's loss, 0..1")
    ft_temperature: float = _opt(4.0, "distillation temperature")
    bn_recal: int = _opt(1000, "calibration images BatchNorm statistics are re-estimated on after a cut")
    bias_correction: bool = _opt(True, "after a cut, reset the classifier bias to keep the mean logits")
    keep_unless_better: bool = _opt(True, "undo a fine-tuning round that lowers validation accuracy")
    bias_images: int = _opt(256, "calibration images that measure the cut network's mean features")
    verbose: bool = _opt(True, "print every iteration")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check()

    @classmethod
    def from_context(cls, ctx: Context) -> LoopOptions:
        """The Context's validated options (validated here when the loop runs outside `register`)."""
        o = ctx.opts if isinstance(ctx.opts, cls) else parse_options(cls, ctx.options, "lda")
        assert isinstance(o, cls)
        return o

    def check(self) -> None:
        if self.min_accuracy is not None and not 0.0 < self.min_accuracy <= 1.0:
            raise NetslimError(f"option min_accuracy must be in (0, 1], not {self.min_accuracy}")
        if self.eta_start <= 0 or self.eta_step < 0 or self.max_iters < 1:
            raise NetslimError("lda needs eta_start > 0, eta_step >= 0 and max_iters >= 1")
        if self.threshold_origin not in ("auto", "zero", "min"):
            raise NetslimError(f"lda option threshold_origin must be auto, zero or min, not {self.threshold_origin!r}")
        if self.fisher not in ("diag", "eig"):
            raise NetslimError(f"lda option fisher must be diag or eig, not {self.fisher!r}")
        if self.head_tokens not in ("max", "cls"):
            raise NetslimError(f"lda option head_tokens must be max or cls, not {self.head_tokens!r}")
        if self.select not in ("smallest", "best"):
            raise NetslimError(f"lda option select must be smallest or best, not {self.select!r}")
        if self.trace_images < 1 or self.min_keep < 1 or self.patience < 0:
            raise NetslimError("lda needs trace_images >= 1, min_keep >= 1 and patience >= 0")
