"""The registered `lda` method: run the loop (loop.py) and hand back its network and report (report.py).

It lives apart from core.py (the Fisher math) and loop.py, so that those two never import each other.
"""

from __future__ import annotations

from netslim.methods.base import Context, MethodResult, register
from netslim.methods.lda.loop import run_loop
from netslim.methods.lda.options import LoopOptions
from netslim.methods.lda.report import report


@register("lda", "Task-dependent deep LDA: Fisher utility at the pre-decision layer, traced back, pruned and "
          "fine-tuned iteratively (--opt min_accuracy=A or --target)", needs_labels=True, options=LoopOptions)
def lda(ctx: Context) -> MethodResult:
    outcome = run_loop(ctx)
    sections, artifacts = report(outcome)
    return MethodResult(outcome.plan, model=outcome.model, report=sections, artifacts=artifacts)
