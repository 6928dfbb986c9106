"""Canonical, length-limited Huffman coding of small-alphabet integer streams, vectorised with numpy.

Only the code lengths are stored (one byte per symbol of the alphabet); the codes are rebuilt
canonically. Codes are at most 16 bits, so decoding is one table lookup per symbol. The bit offset of
every `block`-th symbol is stored too: all blocks then decode in parallel, one numpy step per symbol
position, instead of one Python step per symbol.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

from netslim.errors import NetslimError

MAX_LEN = 16
BLOCK = 1024


@dataclass
class Encoded:
    """A coded stream: bits (uint8, MSB first), its code lengths, symbol count and block start offsets."""

    data: np.ndarray  # uint8
    lengths: np.ndarray  # uint8, one per symbol of the alphabet (0: unused); trailing zeros trimmed
    count: int
    nbits: int
    offsets: np.ndarray  # uint32 bit offset of symbol i * block
    block: int = BLOCK

    @property
    def nbytes(self) -> int:
        """Bytes stored for this stream: bits, length table and block offsets."""
        return int(self.data.nbytes + self.lengths.nbytes + self.offsets.nbytes)


def code_lengths(freq: np.ndarray, max_len: int = MAX_LEN) -> np.ndarray:
    """Huffman code length per symbol (0 for absent ones), no longer than `max_len` bits.

    Too-long codes (very skewed counts) are avoided by flattening the counts and rebuilding, which
    costs a negligible fraction of a bit per symbol.
    """
    freq = np.asarray(freq, dtype=np.int64).copy()
    used = np.flatnonzero(freq > 0)
    lengths = np.zeros(len(freq), dtype=np.uint8)
    if len(used) == 0:
        return lengths
    if len(used) == 1:
        lengths[used[0]] = 1
        return lengths
    if len(used) > 2**max_len:
        raise NetslimError(f"alphabet of {len(used)} symbols cannot be coded in {max_len} bits")
    while True:
        depth = _huffman_depths(freq[used])
        if depth.max() <= max_len:
            lengths[used] = depth
            return lengths
        freq[used] = (freq[used] >> 1) | 1


def _huffman_depths(freq: np.ndarray) -> np.ndarray:
    heap: list[tuple[int, int, list[int]]] = [(int(f), i, [i]) for i, f in enumerate(freq)]
    heapq.heapify(heap)
    depth = np.zeros(len(freq), dtype=np.int64)
    tie = len(freq)
    while len(heap) > 1:
        fa, _, a = heapq.heappop(heap)
        fb, _, b = heapq.heappop(heap)
        members = a + b
        depth[members] += 1
        heapq.heappush(heap, (fa + fb, tie, members))
        tie += 1
    return depth


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Canonical code of every symbol (by length, then symbol value), as uint32."""
    codes = np.zeros(len(lengths), dtype=np.uint32)
    order = sorted((int(n), s) for s, n in enumerate(lengths) if n > 0)
    code, prev = 0, 0
    for n, s in order:
        code <<= n - prev
        codes[s] = code
        code += 1
        prev = n
    return codes


def encode(symbols: np.ndarray, alphabet: int | None = None, block: int = BLOCK) -> Encoded:
    """Huffman-code a stream of non-negative ints (alphabet size defaults to max + 1)."""
    symbols = np.asarray(symbols, dtype=np.int64).ravel()
    if symbols.size and symbols.min() < 0:
        raise NetslimError("Huffman coding needs non-negative symbols")
    size = alphabet if alphabet is not None else (int(symbols.max()) + 1 if symbols.size else 1)
    lengths = code_lengths(np.bincount(symbols, minlength=size))
    codes = canonical_codes(lengths)
    lens = lengths.astype(np.int64)[symbols]
    ends = np.cumsum(lens)
    nbits = int(ends[-1]) if symbols.size else 0
    offsets = (ends - lens)[::block].astype(np.uint32) if symbols.size else np.zeros(0, np.uint32)
    if nbits >= 2**32:
        raise NetslimError("stream too long for 32-bit block offsets")
    chunks = []
    j = np.arange(MAX_LEN, dtype=np.int64)
    for s in range(0, symbols.size, 1 << 20):
        c = codes[symbols[s:s + (1 << 20)]].astype(np.int64)
        n = lens[s:s + (1 << 20)]
        shift = np.clip(n[:, None] - 1 - j[None], 0, None)
        bits = ((c[:, None] >> shift) & 1).astype(bool)
        chunks.append(bits[j[None] < n[:, None]])
    flat = np.concatenate(chunks) if chunks else np.zeros(0, bool)
    data = np.packbits(flat)
    last = int(np.flatnonzero(lengths).max()) + 1 if lengths.any() else 0
    return Encoded(data, lengths[:last].copy(), int(symbols.size), nbits, offsets, block)


def decode(enc: Encoded) -> np.ndarray:
    """The symbols of an encoded stream (int64), all blocks decoded side by side."""
    count = enc.count
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    lengths = enc.lengths.astype(np.int64)
    codes = canonical_codes(enc.lengths)
    table_sym = np.zeros(1 << MAX_LEN, dtype=np.int64)
    table_len = np.zeros(1 << MAX_LEN, dtype=np.int64)
    for s in np.flatnonzero(lengths):
        n = int(lengths[s])
        lo = int(codes[s]) << (MAX_LEN - n)
        table_sym[lo:lo + (1 << (MAX_LEN - n))] = s
        table_len[lo:lo + (1 << (MAX_LEN - n))] = n
    data = np.concatenate([enc.data.astype(np.int64), np.zeros(4, np.int64)])
    pos = enc.offsets.astype(np.int64).copy()
    nblocks = len(pos)
    if nblocks != -(-count // enc.block):
        raise NetslimError("corrupt Huffman stream: block offsets do not match the symbol count")
    out = np.zeros(nblocks * enc.block, dtype=np.int64)
    starts = np.arange(nblocks, dtype=np.int64) * enc.block
    for t in range(enc.block):
        if t == count - starts[-1]:  # the last block is shorter: drop it from here on
            pos, starts, nblocks = pos[:-1], starts[:-1], nblocks - 1
            if nblocks == 0:
                break
        byte = pos >> 3
        if byte.size and byte.max() >= len(data) - 3:
            raise NetslimError("corrupt Huffman stream: it ends early")
        window = (data[byte] << 16) | (data[byte + 1] << 8) | data[byte + 2]
        peek = (window >> (8 - (pos & 7))) & 0xFFFF
        n = table_len[peek]
        if not n.all():
            raise NetslimError("corrupt Huffman stream: invalid code")
        out[starts + t] = table_sym[peek]
        pos = pos + n
    return out[:count]
