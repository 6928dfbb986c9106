"""Pieces several methods share: statistics passes, spectra, rankings, correlation selection."""
