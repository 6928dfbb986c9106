"""Structure: apply a Plan to a model (channels, depth, factorized layers), fold BN, save and reload."""
