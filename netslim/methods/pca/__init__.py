"""PCA design: width and depth from significant dimensions; importing registers the method."""

from netslim.methods.pca import core  # noqa: F401
