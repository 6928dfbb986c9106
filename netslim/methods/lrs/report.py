"""LRS's report section, kept apart from the decomposition so the algorithm reads alone."""

from __future__ import annotations

from typing import Any

from netslim.report.markdown import table


def report(rows: list[dict[str, Any]], images: int, objective: str, inputs: str, positions: int) -> list[str]:
    """The decomposition section: per-layer rank, non-zeros, size and errors, with the totals."""
    body = [[r["layer"], f"{r['m']}×{r['d']}", r["rank"], r["nnz"], r["params"],
             f"{r['params'] / r['dense_params']:.3f}", r["bytes"], f"{r['weight_error']:.4f}",
             "–" if r["feature_error"] is None else f"{r['feature_error']:.4f}", r["seconds"]] for r in rows]
    tot_p, tot_d = sum(r["params"] for r in rows), sum(r["dense_params"] for r in rows)
    tot_b, tot_db = sum(r["bytes"] for r in rows), sum(r["dense_bytes"] for r in rows)
    body.append(["**factorized layers**", "", "", sum(r["nnz"] for r in rows), tot_p,
                 f"{tot_p / max(tot_d, 1):.3f}", tot_b, "", "", ""])
    what = "feature maps" if objective == "features" else "weights only"
    return [
        f"## Low-rank + sparse decomposition (GreBdec, fitted to {what}, {inputs} inputs)\n\n"
        f"W ≈ U V + S per layer; params = r·(m + d) + nnz (+ bias); bytes = float32 U, V, bias + S in CSR "
        f"(value + {2}-byte column index per non-zero, 4-byte row pointers); dense: {tot_db:,} bytes. Errors are "
        f"relative (‖W − Ŵ‖/‖W‖ and ‖Y − Ŷ‖/‖Y‖ on {images} calibration images × "
        f"{positions} positions). The sparse part runs as a masked dense layer unless "
        "netslim.surgery.factorized.use_sparse_kernel switches it to CSR.\n\n"
        + table(["layer", "m×d", "rank", "non-zeros", "params", "params/dense", "bytes", "weight err",
                 "feature-map err", "s"], body)]
