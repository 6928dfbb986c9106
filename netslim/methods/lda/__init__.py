"""Task-dependent deep LDA pruning; importing registers the method."""

from netslim.methods.lda import method  # noqa: F401
from netslim.methods.lda.core import predecision_moments
from netslim.methods.lda.loop import finetune_round
from netslim.methods.lda.options import LoopOptions
from netslim.methods.lda.step import recalibrate

__all__ = ["LoopOptions", "finetune_round", "predecision_moments", "recalibrate"]
