"""GreBdec's options (`--opt key=value`): per-layer knobs or the target's split, the fit and its calibration."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from netslim.errors import NetslimError
from netslim.methods.base import Context, MethodOptions, parse_options

OBJECTIVES = ("features", "weights")
INPUTS = ("original", "compressed")


def _opt(default: Any, text: str) -> Any:
    return field(default=default, metadata={"help": text})


@dataclass
class Config(MethodOptions):
    """lrs's options; the checks that need the target (check) run when the method does."""

    objective: str = _opt("features", "fit each layer to its feature maps (features) or to its weights only")
    inputs: str = _opt("original", "original | compressed (fit each layer to the inputs the already-compressed "
                                   "layers give)")
    rank: int | None = _opt(None, "rank of each factorized layer's low-rank part")
    rank_ratio: float | None = _opt(None, "rank as a fraction of each layer's min(outputs, inputs·k·k), 0..1")
    sparsity: float | None = _opt(None, "fraction of each layer's weights the sparse part leaves at zero, 0..1 "
                                        "(0.95 keeps 5%)")
    sparse_share: float | None = _opt(None, "with --target: fraction of each layer's budget spent on S, in [0, 1) "
                                            "(default 0.5 for params, 0 for flops: S's FLOPs count dense)")
    images: int = _opt(1024, "calibration images used")
    positions: int = _opt(8, "random output positions per image and layer")
    stages: int = _opt(4, "GreBdec stages")
    sweeps: int = _opt(2, "alternating sweeps per stage")
    final_sweeps: int = _opt(4, "sweeps after the last stage")
    power_iters: int = _opt(2, "power iterations of the low-rank step")
    ridge: float = _opt(1e-4, "fraction of mean diag(G) added to G (dead inputs, fewer patches than d)")
    include_classifier: bool = _opt(False, "factorize the classifier too")
    per_layer: dict[str, dict[str, Any]] | None = _opt(None, 'per-layer overrides, JSON: {"layer": {"rank": R, '
                                                             '"nnz": N | "sparsity": F}}')
    skip: tuple[str, ...] = _opt((), "layers left dense, comma-separated")
    seed: int = _opt(0, "seed of the calibration sample and the solver")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.objective not in OBJECTIVES:
            raise NetslimError(f"lrs objective must be one of {', '.join(OBJECTIVES)}, not {self.objective!r}")
        if self.inputs not in INPUTS:
            raise NetslimError(f"lrs inputs must be one of {', '.join(INPUTS)}, not {self.inputs!r}")
        if self.rank is not None and self.rank < 0:
            raise NetslimError(f"option rank must be a non-negative integer, not {self.rank}")
        if self.rank_ratio is not None and not 0 <= self.rank_ratio <= 1:
            raise NetslimError(f"option rank_ratio must be in [0, 1], not {self.rank_ratio}")
        if self.sparsity is not None and not 0 <= self.sparsity <= 1:
            raise NetslimError(f"option sparsity (fraction of zeros in S) must be in [0, 1], not {self.sparsity}")
        if self.sparse_share is not None and not 0 <= self.sparse_share < 1:
            raise NetslimError(f"lrs sparse_share must be in [0, 1), not {self.sparse_share}")
        if self.rank is not None and self.rank_ratio is not None:
            raise NetslimError("give option rank or rank_ratio, not both")
        if self.images < 1 or self.positions < 1:
            raise NetslimError("lrs images and positions must be positive")

    @classmethod
    def from_ctx(cls, ctx: Context) -> Config:
        """The Context's validated options, checked against its target."""
        c = ctx.opts if isinstance(ctx.opts, cls) else parse_options(cls, ctx.options, "lrs")
        assert isinstance(c, cls)
        c.check(ctx)
        return c

    def check(self, ctx: Context) -> None:
        if ctx.target is not None and (self.rank is not None or self.rank_ratio is not None
                                       or self.sparsity is not None):
            raise NetslimError("--target splits the budget across layers itself; drop the rank, rank_ratio and "
                               "sparsity options (tune the split with --opt sparse_share=F, per-layer choices with "
                               "--opt per_layer=...)")
        if ctx.target is not None and ctx.target.kind not in ("params", "flops"):
            raise NetslimError(f"lrs meets a params or flops target, not {ctx.target}: it has no latency model")
        if ctx.target is not None and ctx.target.kind == "flops" and self.sparse_share:
            raise NetslimError(f"lrs with {ctx.target} factorizes without a sparse part: S saves FLOPs only with a "
                               "sparse kernel, so a dense runtime counts it whole; drop --opt sparse_share")

    def share(self, kind: str) -> float:
        """Fraction of each layer's budget spent on S under a `kind` target (none under flops)."""
        if self.sparse_share is not None:
            return self.sparse_share
        return 0.5 if kind == "params" else 0.0

    def default_knobs(self) -> tuple[float | None, int | None, float | None]:
        """(rank_ratio, rank, sparsity); what is not given is 0, both missing gives the defaults."""
        if self.rank is None and self.rank_ratio is None and self.sparsity is None:
            return 0.125, None, 0.97
        return (self.rank_ratio if self.rank is None else None), self.rank, self.sparsity
