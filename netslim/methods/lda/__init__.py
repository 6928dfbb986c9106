"""Task-dependent deep LDA pruning; importing registers the method."""

from netslim.methods.lda import method  # noqa: F401
