"""Low-rank + sparse layers: W ≈ U V + S executed as a thin layer, a 1×1 mix and a parallel masked layer.

A Conv2d(C→m, k×k) becomes `basis` (k×k conv C→r, V), `mix` (1×1 conv r→m, U, carrying the bias) and
`sparse` (k×k conv C→m whose weight is multiplied by the fixed `mask` buffer in every forward, so
fine-tuning moves only S's non-zeros and a checkpoint reloads the support). Linear layers likewise.
`factorize_layers` gives layers these shapes (also on the meta device, for sizing and reloading);
the values come from the solver (netslim.methods.lrs.solver) through `set_factors`.

About 310 lines: the conv and linear variants, their meta-device shapes and their storage counts must
agree exactly, so they stay side by side.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from netslim.errors import NetslimError

KINDS = {"conv": nn.Conv2d, "linear": nn.Linear}


class LowRankSparse(nn.Module):
    """Common part: storage accounting, the dense equivalent weight and filling from factors."""

    rank: int
    nnz: int
    out_dim: int
    in_dim: int
    basis: nn.Module | None
    mix: nn.Module | None
    sparse: nn.Module | None
    mask: torch.Tensor | None

    def _init_parts(self, rank: int, nnz: int, m: int, d: int) -> None:
        if not 0 <= rank <= min(m, d):
            raise NetslimError(f"rank {rank} is impossible for a {m}×{d} weight (0..{min(m, d)})")
        if not 0 <= nnz <= m * d:
            raise NetslimError(f"{nnz} non-zeros are impossible for a {m}×{d} weight (0..{m * d})")
        if rank == 0 and nnz == 0:
            raise NetslimError("a factorized layer needs rank > 0 or some non-zeros; both are 0")
        self.rank, self.nnz, self.out_dim, self.in_dim = rank, nnz, m, d
        self.sparse_kernel = False  # run S as a CSR matmul at inference (see use_sparse_kernel)
        self._csr: torch.Tensor | None = None  # its snapshot of S, built at the first inference call

    @property
    def bias(self) -> torch.Tensor | None:
        owner = self.mix if self.rank > 0 else self.sparse
        return owner.bias if owner is not None else None

    def stored_params(self) -> int:
        """Values a deployment stores: r·(m + d) for U, V, the non-zeros of S, and the bias."""
        return self.rank * (self.out_dim + self.in_dim) + self.nnz + (self.out_dim if self.bias is not None else 0)

    def storage_bytes(self, value_bytes: int = 4) -> dict[str, int]:
        """Bytes of U, V and bias (dense) and of S in CSR (values + column indices + row pointers)."""
        index = 2 if self.in_dim <= 2**16 else 4
        pointer = 4 if self.nnz < 2**31 else 8
        dense = value_bytes * (self.rank * (self.out_dim + self.in_dim) + (self.out_dim if self.bias is not None
                                                                           else 0))
        csr = (value_bytes + index) * self.nnz + (pointer * (self.out_dim + 1) if self.nnz else 0)
        return {"lowrank": dense, "sparse_csr": csr, "total": dense + csr,
                "dense_original": value_bytes * (self.out_dim * self.in_dim
                                                 + (self.out_dim if self.bias is not None else 0))}

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """U (m×r), V (r×d) and the masked S (m×d) as matrices."""
        m, d = self.out_dim, self.in_dim
        ref = next(self.parameters())
        u = self.mix.weight.reshape(m, self.rank) if self.mix is not None else ref.new_zeros(m, 0)
        v = self.basis.weight.reshape(self.rank, d) if self.basis is not None else ref.new_zeros(0, d)
        s = ((self.sparse.weight * self.mask).reshape(m, d) if self.sparse is not None
             else ref.new_zeros(m, d))
        return u, v, s

    def dense_weight(self) -> torch.Tensor:
        """U V + S as an m×d matrix (the dense layer this module computes)."""
        u, v, s = self.factors()
        return u @ v + s

    @torch.no_grad()
    def set_factors(self, u: torch.Tensor, v: torch.Tensor, s: torch.Tensor | None = None,
                    mask: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> None:
        """Fill U (m×r), V (r×d), S (m×d, zero off `mask`) and the bias; shapes must match rank and nnz."""
        m, d, r = self.out_dim, self.in_dim, self.rank
        if tuple(u.shape) != (m, r) or tuple(v.shape) != (r, d):
            raise NetslimError(f"factors of shape {tuple(u.shape)}, {tuple(v.shape)} do not fit rank {r} of a "
                               f"{m}×{d} layer")
        if self.basis is not None:
            self.basis.weight.copy_(v.reshape(self.basis.weight.shape))
            self.mix.weight.copy_(u.reshape(self.mix.weight.shape))
        if self.sparse is not None:
            if s is None:
                raise NetslimError("this layer has a sparse part; give S")
            mask = (s != 0) if mask is None else mask.bool()
            if int(mask.sum()) > self.nnz:
                raise NetslimError(f"S has {int(mask.sum())} non-zeros, the layer holds {self.nnz}")
            self.mask.copy_(mask.reshape(self.mask.shape))
            self.sparse.weight.copy_((s * mask).reshape(self.sparse.weight.shape))
        if bias is not None and self.bias is not None:
            self.bias.copy_(bias)
        self._csr = None

    def _use_csr(self) -> bool:
        return self.sparse_kernel and not self.training and not torch.is_grad_enabled()

    def _sparse_csr(self) -> torch.Tensor:
        if self._csr is None:
            w = (self.sparse.weight * self.mask).reshape(self.out_dim, self.in_dim)
            with warnings.catch_warnings():  # "sparse CSR support is in beta"
                warnings.simplefilter("ignore", UserWarning)
                self._csr = w.detach().to_sparse_csr()
        return self._csr

    def __getstate__(self) -> dict[str, Any]:  # copies and pickles drop the CSR snapshot
        state = self.__dict__.copy()
        state["_csr"] = None
        return state

    def extra_repr(self) -> str:
        return f"{self.in_dim}→{self.out_dim}, rank={self.rank}, nnz={self.nnz}"


class LowRankSparseConv2d(LowRankSparse):
    """Conv2d(C→m) as (k×k conv C→r) → (1×1 conv r→m, bias) plus a masked k×k conv C→m, summed."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, stride: Any = 1, padding: Any = 0,
                 dilation: Any = 1, bias: bool = True, rank: int = 1, nnz: int = 0,
                 device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        k = nn.modules.utils._pair(kernel_size)
        self._init_parts(rank, nnz, out_channels, in_channels * k[0] * k[1])
        self.conv_args = {"stride": nn.modules.utils._pair(stride), "padding": padding,
                          "dilation": nn.modules.utils._pair(dilation)}
        kw = {"device": device, "dtype": dtype}
        self.basis = nn.Conv2d(in_channels, rank, k, bias=False, **self.conv_args, **kw) if rank else None
        self.mix = nn.Conv2d(rank, out_channels, 1, bias=bias, **kw) if rank else None
        self.sparse = nn.Conv2d(in_channels, out_channels, k, bias=bias and not rank, **self.conv_args,
                                **kw) if nnz else None
        if nnz:
            self.register_buffer("mask", torch.zeros(out_channels, in_channels, *k, dtype=torch.bool,
                                                     device=device))
        else:
            self.mask = None
        self.kernel_size = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.mix(self.basis(x)) if self.rank else None
        if self.sparse is not None:
            if self._use_csr():
                s = self._csr_conv(x)
            else:
                s = F.conv2d(x, self.sparse.weight * self.mask, self.sparse.bias, **self.conv_args)
            out = s if out is None else out + s
        return out

    def _csr_conv(self, x: torch.Tensor) -> torch.Tensor:
        a = self.conv_args
        n, _, h, w = x.shape
        kh, kw = self.kernel_size
        pad = nn.modules.utils._pair(a["padding"]) if not isinstance(a["padding"], str) else None
        if pad is None:
            return F.conv2d(x, self.sparse.weight * self.mask, self.sparse.bias, **a)
        ho = (h + 2 * pad[0] - a["dilation"][0] * (kh - 1) - 1) // a["stride"][0] + 1
        wo = (w + 2 * pad[1] - a["dilation"][1] * (kw - 1) - 1) // a["stride"][1] + 1
        cols = F.unfold(x, (kh, kw), dilation=a["dilation"], padding=pad, stride=a["stride"])  # n, d, L
        y = self._sparse_csr() @ cols.transpose(0, 1).reshape(self.in_dim, -1)  # m, n·L
        y = y.reshape(self.out_dim, n, ho, wo).transpose(0, 1)
        return y if self.sparse.bias is None else y + self.sparse.bias.view(1, -1, 1, 1)


class LowRankSparseLinear(LowRankSparse):
    """Linear(d→m) as Linear(d→r) → Linear(r→m, bias) plus a masked Linear(d→m), summed."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, rank: int = 1, nnz: int = 0,
                 device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        self._init_parts(rank, nnz, out_features, in_features)
        kw = {"device": device, "dtype": dtype}
        self.basis = nn.Linear(in_features, rank, bias=False, **kw) if rank else None
        self.mix = nn.Linear(rank, out_features, bias=bias, **kw) if rank else None
        self.sparse = nn.Linear(in_features, out_features, bias=bias and not rank, **kw) if nnz else None
        if nnz:
            self.register_buffer("mask", torch.zeros(out_features, in_features, dtype=torch.bool, device=device))
        else:
            self.mask = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.mix(self.basis(x)) if self.rank else None
        if self.sparse is not None:
            if self._use_csr():
                flat = x.reshape(-1, self.in_dim)
                s = (self._sparse_csr() @ flat.T).T.reshape(*x.shape[:-1], self.out_dim)
                s = s if self.sparse.bias is None else s + self.sparse.bias
            else:
                s = F.linear(x, self.sparse.weight * self.mask, self.sparse.bias)
            out = s if out is None else out + s
        return out


def layer_kind(module: nn.Module) -> str | None:
    """"conv" for a plain (groups=1, zero-padded) Conv2d, "linear" for a Linear, None otherwise."""
    if isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros":
        return "conv"
    if isinstance(module, nn.Linear):
        return "linear"
    return None


def matrix_shape(module: nn.Module) -> tuple[int, int]:
    """(m, d) of the layer's weight as a matrix: outputs × (inputs · kernel area)."""
    w = module.weight
    return w.shape[0], math.prod(w.shape[1:])


def nnz_of(entry: dict[str, Any], m: int, d: int) -> int:
    if "nnz" in entry:
        return int(entry["nnz"])
    if "sparsity" in entry:  # fraction of S's entries that are zero
        return int(round((1.0 - float(entry["sparsity"])) * m * d))
    return 0


def build_factorized(module: nn.Module, rank: int, nnz: int) -> LowRankSparse:
    """An empty factorized layer shaped like `module` (same device and dtype, stride, padding, bias)."""
    w = module.weight
    kw = {"device": w.device, "dtype": w.dtype}
    if layer_kind(module) == "conv":
        return LowRankSparseConv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                                   module.padding, module.dilation, module.bias is not None, rank, nnz, **kw)
    if layer_kind(module) == "linear":
        return LowRankSparseLinear(module.in_features, module.out_features, module.bias is not None, rank, nnz,
                                   **kw)
    raise NetslimError(f"cannot factorize a {type(module).__name__} (only Conv2d with groups=1 and Linear)")


@torch.no_grad()
def weight_only_fill(layer: LowRankSparse, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Truncated SVD for U V, then the largest entries of the residual for S (a data-free starting point)."""
    w = weight.detach().reshape(layer.out_dim, layer.in_dim).double()
    r = layer.rank
    if r:
        u, sv, vh = torch.linalg.svd(w, full_matrices=False)
        root = sv[:r].sqrt()
        uu, vv = u[:, :r] * root, root[:, None] * vh[:r]
    else:
        uu, vv = w.new_zeros(layer.out_dim, 0), w.new_zeros(0, layer.in_dim)
    s = mask = None
    if layer.nnz:
        resid = w - uu @ vv
        idx = resid.abs().flatten().topk(layer.nnz).indices
        mask = torch.zeros(resid.numel(), dtype=torch.bool, device=w.device)
        mask[idx] = True
        mask = mask.reshape(resid.shape)
        s = resid * mask
    dt = layer_dtype(layer)
    layer.set_factors(uu.to(dt), vv.to(dt), None if s is None else s.to(dt), mask, bias)


def layer_dtype(layer: nn.Module) -> torch.dtype:
    return next(layer.parameters()).dtype


def factorize_layers(model: nn.Module, spec: dict[str, dict[str, Any]], fill: bool = True) -> nn.Module:
    """Replace each named Conv2d/Linear of `model` (in place) by a LowRankSparse layer of the spec's shape.

    spec: layer -> {"rank": r, "nnz": c (or "sparsity": fraction of zeros), "kind": "conv"|"linear"}.
    With `fill`, materialised weights get a weight-only decomposition (SVD + largest residual entries)
    so that a Plan replayed on a trained base gives a working network; methods overwrite it with their
    solver's factors. Meta-device models are only reshaped.
    """
    for name, entry in spec.items():
        old = model.get_submodule(name)
        kind = layer_kind(old)
        if kind is None:
            raise NetslimError(f"plan factorize: {name!r} is a {type(old).__name__}; only Conv2d (groups=1, zero "
                               "padding) and Linear layers can be factorized")
        if entry.get("kind", kind) != kind:
            raise NetslimError(f"plan factorize: {name!r} is a {kind} layer, the plan says {entry['kind']}")
        if "rank" not in entry:
            raise NetslimError(f"plan factorize: {name!r} has no rank")
        m, d = matrix_shape(old)
        new = build_factorized(old, int(entry["rank"]), nnz_of(entry, m, d))
        if fill and not old.weight.is_meta:
            weight_only_fill(new, old.weight, old.bias)
        new.train(old.training)
        model.set_submodule(name, new)
    return model


def use_sparse_kernel(model: nn.Module, enabled: bool = True) -> int:
    """Run S through a CSR sparse matmul at inference (eval, no grad); returns how many layers switched.

    The masked dense layer used for training costs as much as the original layer; the CSR path costs
    nnz per output position. The CSR copy of S is a snapshot taken at the first inference call after
    this (and after copying the model); call again after changing the weights.
    """
    n = 0
    for m in model.modules():
        if isinstance(m, LowRankSparse) and m.sparse is not None:
            m.sparse_kernel, m._csr = enabled, None
            n += int(enabled)
    return n


def factorized_layers(model: nn.Module) -> dict[str, LowRankSparse]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LowRankSparse)}


__all__ = ["LowRankSparse", "LowRankSparseConv2d", "LowRankSparseLinear", "factorize_layers", "build_factorized",
           "weight_only_fill", "use_sparse_kernel", "factorized_layers", "layer_kind", "matrix_shape"]
