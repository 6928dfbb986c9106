"""Storage compression after structural pruning: weight pruning, k-means weight sharing, Huffman coding."""

from netslim.pack.codec import LayerBytes, load_packed, pack_bytes, unpack_bytes
from netslim.pack.quantize import apply_masks, kmeans_1d, magnitude_masks, mask_hook, quantize_layer, quantize_model

__all__ = ["LayerBytes", "apply_masks", "kmeans_1d", "load_packed", "magnitude_masks", "mask_hook",
           "pack_bytes", "quantize_layer", "quantize_model", "unpack_bytes"]
