"""The packed file: quantized layers as Huffman-coded indices (+ coded sparse positions), the rest raw.

Layout (one safetensors file, no pickle): for a packed weight `K` the tensors `K::codebook` (float16
shared values), `K::sym` / `K::sym_lengths` / `K::sym_offsets` (coded value indices) and, in sparse
mode, `K::gap` / `K::gap_lengths` / `K::gap_offsets` (coded run lengths of zeros before each stored
weight); every other state tensor under its own name. The metadata holds the Plan (so the architecture
rebuilds from the file alone) and one JSON header per packed weight.

Sparse mode is Deep Compression's relative indexing: each stored weight carries the number of zeros
before it; a run longer than 255 is split by an explicit zero "filler" entry. Each layer uses the
sparse or the dense layout, whichever is smaller.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load, save
from torch import nn

from netslim.errors import NetslimError
from netslim.pack.huffman import Encoded, decode, encode
from netslim.plan import Plan
from netslim.surgery.checkpoint import PLAN_KEY, build_from_plan, classes_meta, load_tensors

META_KEY = "netslim_pack"
VERSION = 1
MAX_GAP = 255


@dataclass
class LayerBytes:
    """Storage of one packed weight, in bytes, against its dense float32 size."""

    key: str
    shape: list[int]
    weights: int
    nonzero: int
    bits: int
    shared_values: int
    mode: str
    dense_fp32: int
    parts: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def row(self) -> dict[str, Any]:
        return {"key": self.key, "shape": self.shape, "weights": self.weights, "nonzero": self.nonzero,
                "bits": self.bits, "shared_values": self.shared_values, "mode": self.mode,
                "dense_fp32_bytes": self.dense_fp32, "packed_bytes": self.total, "parts": self.parts,
                "ratio": round(self.dense_fp32 / max(1, self.total), 2),
                "bits_per_weight": round(8 * self.total / max(1, self.weights), 3)}


def _indices(weight: torch.Tensor, codebook: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Positions of the nonzero weights and the codebook index of each (which must match exactly)."""
    w = weight.detach().cpu().float().flatten()
    pos = torch.nonzero(w).flatten()
    values = w[pos]
    book = codebook.float()
    idx = torch.searchsorted(book, values).clamp_max(max(0, book.numel() - 1))
    if book.numel() == 0 and values.numel() or not torch.equal(book[idx], values):
        raise NetslimError("weights are not quantized to their codebook; quantize before packing")
    return pos.numpy(), idx.numpy()


def encode_weight(key: str, weight: torch.Tensor, codebook: torch.Tensor,
                  bits: int) -> tuple[dict[str, torch.Tensor], dict[str, Any], LayerBytes]:
    """Tensors and header storing one quantized weight, and its byte count."""
    codebook = codebook.to(torch.float16).contiguous()
    pos, idx = _indices(weight, codebook)
    n = weight.numel()
    zero = int(codebook.numel())  # the extra symbol meaning an exact zero
    dense_sym = np.full(n, zero, dtype=np.int64)
    dense_sym[pos] = idx
    dense = {"sym": encode(dense_sym, zero + 1)}
    prev_end = np.concatenate([[0], pos[:-1] + 1]) if pos.size else np.zeros(0, np.int64)
    gaps = pos - prev_end
    fillers = gaps // (MAX_GAP + 1)
    real = np.cumsum(fillers + 1) - 1
    total = int(real[-1]) + 1 if pos.size else 0
    gap_stream = np.full(total, MAX_GAP, dtype=np.int64)
    sym_stream = np.full(total, zero, dtype=np.int64)
    gap_stream[real] = gaps - fillers * (MAX_GAP + 1)
    sym_stream[real] = idx
    sparse = {"sym": encode(sym_stream, zero + 1), "gap": encode(gap_stream, MAX_GAP + 1)}
    streams = sparse if sum(e.nbytes for e in sparse.values()) < sum(e.nbytes for e in dense.values()) else dense
    mode = "sparse" if streams is sparse else "dense"
    tensors = {f"{key}::codebook": codebook}
    header: dict[str, Any] = {"shape": list(weight.shape), "mode": mode, "bits": bits, "streams": {}}
    for name, enc in streams.items():
        tensors[f"{key}::{name}"] = torch.from_numpy(enc.data.copy())
        tensors[f"{key}::{name}_lengths"] = torch.from_numpy(enc.lengths.copy())
        tensors[f"{key}::{name}_offsets"] = torch.from_numpy(enc.offsets.astype(np.int32))
        header["streams"][name] = {"count": enc.count, "nbits": enc.nbits, "block": enc.block}
    parts = {"codebook": codebook.numel() * 2}
    for name, enc in streams.items():
        label = "indices" if name == "sym" else "positions"
        parts[label] = int(enc.data.nbytes)
        parts["tables"] = parts.get("tables", 0) + int(enc.lengths.nbytes + enc.offsets.nbytes)
    report = LayerBytes(key, list(weight.shape), n, int(pos.size), bits, int(codebook.numel()), mode, 4 * n, parts)
    return tensors, header, report


def decode_weight(key: str, tensors: dict[str, torch.Tensor], header: dict[str, Any]) -> torch.Tensor:
    """The float32 weight a packed entry stores (exactly the quantized weight that was packed)."""
    try:
        codebook = tensors[f"{key}::codebook"].float()
        streams = {}
        for name, h in header["streams"].items():
            enc = Encoded(tensors[f"{key}::{name}"].numpy(), tensors[f"{key}::{name}_lengths"].numpy(),
                          int(h["count"]), int(h["nbits"]), tensors[f"{key}::{name}_offsets"].numpy().astype(np.uint32),
                          int(h["block"]))
            streams[name] = torch.from_numpy(decode(enc))
        shape = [int(s) for s in header["shape"]]
    except (KeyError, TypeError, ValueError) as e:
        raise NetslimError(f"packed entry {key!r} is incomplete or corrupt ({e})") from None
    n = int(np.prod(shape)) if shape else 1
    zero = codebook.numel()
    book = torch.cat([codebook, torch.zeros(1)])
    sym = streams["sym"]
    if sym.numel() and int(sym.max()) > zero:
        raise NetslimError(f"packed entry {key!r} refers to a shared value that does not exist")
    if header["mode"] == "dense":
        if sym.numel() != n:
            raise NetslimError(f"packed entry {key!r} holds {sym.numel()} values for {n} weights")
        return book[sym].reshape(shape)
    pos = torch.cumsum(streams["gap"] + 1, 0) - 1
    if pos.numel() != sym.numel() or (pos.numel() and int(pos[-1]) >= n):
        raise NetslimError(f"packed entry {key!r}: positions run past the end of the weight")
    w = torch.zeros(n)
    w[pos] = book[sym]
    return w.reshape(shape)


def pack_bytes(model: nn.Module, plan: Plan, codebooks: dict[str, tuple[torch.Tensor, int]],
               classes: list[str] | None = None) -> tuple[bytes, list[LayerBytes], int]:
    """The packed file's bytes, the per-layer byte counts, and the bytes of the raw (unpacked) tensors.

    `codebooks` maps a layer name to (float16 shared values, bits); its weight must already be quantized.
    `classes`: the names the outputs score, kept in the metadata as save_model keeps them.
    """
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors: dict[str, torch.Tensor] = {}
    headers: dict[str, Any] = {}
    reports = []
    for name, (codebook, bits) in codebooks.items():
        key = f"{name}.weight"
        if key not in state:
            raise NetslimError(f"layer {name!r} has no weight to pack")
        t, h, r = encode_weight(key, state.pop(key), codebook, bits)
        tensors |= t
        headers[key] = h
        reports.append(r)
    raw = 0
    for key, value in state.items():
        tensors[key] = value.clone()
        raw += value.numel() * value.element_size()
    meta = {PLAN_KEY: plan.to_json(), "arch": plan.arch,
            META_KEY: json.dumps({"version": VERSION, "format": "netslim-pack", "weights": headers}),
            **classes_meta(classes, plan.out_classes)}
    return save(tensors, metadata=meta), reports, raw


def unpack_bytes(blob: bytes, source: str = "packed file") -> tuple[dict[str, torch.Tensor], Plan]:
    """The full state dict (packed weights decoded) and the Plan of a packed file's bytes."""
    try:
        tensors = load(blob)
        header_len = int.from_bytes(blob[:8], "little")
        meta = json.loads(blob[8:8 + header_len]).get("__metadata__", {}) or {}
    except (SafetensorError, ValueError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise NetslimError(f"{source} is not a packed netslim file ({e})") from None
    if META_KEY not in meta or PLAN_KEY not in meta:
        raise NetslimError(f"{source} is not a packed netslim file (no pack header)")
    try:
        info = json.loads(meta[META_KEY])
    except json.JSONDecodeError as e:
        raise NetslimError(f"{source}: the pack header is not valid JSON ({e})") from None
    if not isinstance(info, dict) or not isinstance(info.get("weights"), dict) \
            or not isinstance(info.get("version", 0), int):
        raise NetslimError(f"{source}: the pack header is malformed")
    if int(info.get("version", 0)) > VERSION:
        raise NetslimError(f"{source} was packed by a newer netslim; upgrade to read it")
    plan = Plan.from_json(meta[PLAN_KEY], source)
    state = {k: v for k, v in tensors.items() if "::" not in k}
    for key, header in info["weights"].items():
        state[key] = decode_weight(key, tensors, header)
    return state, plan


def load_packed(path: Path, device: str | torch.device = "cpu") -> tuple[nn.Module, Plan]:
    """Rebuild the network stored in a packed file (its architecture comes from the Plan inside)."""
    path = Path(path)
    if not path.is_file():
        raise NetslimError(f"packed file {path} does not exist")
    state, plan = unpack_bytes(path.read_bytes(), str(path))
    model = build_from_plan(plan, device)
    load_tensors(model, state, str(path), plan.arch)
    return model.eval(), plan
