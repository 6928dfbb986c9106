"""The jobs a user runs, each a sequence of the pipeline's stages: compress, analyse, bench, pack, export, demo."""
