"""vit_tiny: netslim's methods against torch-pruning's criteria on attention heads and MLP widths."""
