"""What a repair did, per layer: refitted or why not, reconstruction error before and after, cost."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class LayerRepair:
    """One consumer layer. Errors are relative, ‖Y − Ŷ‖/‖Y‖ on the layer's kept outputs (pre-BN)."""

    name: str
    refitted: bool
    reason: str | None = None  # why the layer was left as it is
    error_before: float | None = None
    error_after: float | None = None
    rows: int = 0  # calibration rows (images × positions) the fit used
    dim: int = 0  # unknowns per output channel (bias column included)
    seconds: float = 0.0
    target: str = "layer"  # "layer": its own output; "block": the residual sum it feeds


@dataclass
class RefitReport:
    """Per-layer outcome of `lsq_refit` or `compensate_bias`, and totals."""

    method: str  # "lsq" | "bias"
    layers: list[LayerRepair] = field(default_factory=list)
    images: int = 0  # calibration images seen per layer
    holdout_images: int = 0  # images the errors were measured on (0: measured on the calibration images)
    positions: int | None = None
    ridge: float | None = None
    seconds: float = 0.0
    walked: bool = False  # inputs came from stepped graph walks (one forward in all), not a forward per layer

    @property
    def refitted(self) -> list[str]:
        return [r.name for r in self.layers if r.refitted]

    @property
    def skipped(self) -> dict[str, str]:
        return {r.name: r.reason or "" for r in self.layers if not r.refitted}

    def totals(self) -> dict[str, Any]:
        done = [r for r in self.layers if r.refitted]
        before = [r.error_before for r in done if r.error_before is not None]
        after = [r.error_after for r in done if r.error_after is not None]
        return {"refitted": len(done), "skipped": len(self.layers) - len(done), "seconds": round(self.seconds, 2),
                "rows": sum(r.rows for r in done),
                "mean_error_before": sum(before) / len(before) if before else None,
                "mean_error_after": sum(after) / len(after) if after else None}

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "walked": self.walked, "images": self.images,
                "holdout_images": self.holdout_images,
                "positions": self.positions, "ridge": self.ridge, "totals": self.totals(),
                "layers": [asdict(r) for r in self.layers]}

    def to_markdown(self) -> str:
        from netslim.report.markdown import table

        what = {"lsq": "least-squares refit", "bias": "bias compensation"}.get(self.method, self.method)
        where = f"{self.holdout_images} held-out images" if self.holdout_images else \
            f"the {self.images} calibration images"
        rows = [[r.name, "refitted" if r.refitted else f"skipped: {r.reason}", _err(r.error_before),
                 _err(r.error_after), r.rows or "", r.dim or "", f"{r.seconds:.2f}"] for r in self.layers]
        t = self.totals()
        rows.append(["**total**", f"{t['refitted']} refitted, {t['skipped']} skipped", _err(t["mean_error_before"]),
                     _err(t["mean_error_after"]), t["rows"], "", f"{t['seconds']:.2f}"])
        return (f"## Repair: {what}\n\nPer consumer of a cut layer, relative error ‖Y − Ŷ‖/‖Y‖ of its output "
                f"(pre-BN, kept channels) against the original network's, on {where}; totals are means.\n\n"
                + table(["layer", "action", "error before", "error after", "rows", "dim", "s"], rows))


def _err(v: float | None) -> str:
    return "–" if v is None else f"{v:.4f}"
