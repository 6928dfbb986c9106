"""GreBdec: W ≈ U V + S fitted to a layer's output feature maps, from second moments only.

With calibration inputs X̂ (d × n im2col patches, what the layer will see) and the original outputs
Y (m × n), ‖Y − Ŵ X̂‖² = ‖Y‖² − 2 tr(P Ŵᵀ) + tr(Ŵ G Ŵᵀ) with G = X̂ X̂ᵀ and P = Y X̂ᵀ. Writing
T = P G⁻¹ (T = W when X̂ are the original inputs), this is a constant plus tr((T − Ŵ) G (T − Ŵ)ᵀ):
a weighted Frobenius problem in the metric G, so nothing of size n is ever kept. G = I gives the
weight-only variant ‖W − U V − S‖².

Alternating minimisation, all closed form (no SVD in the loop):
- U-step: U = (T − S) G Vᵀ (V G Vᵀ)⁻¹, then U is orthonormalised (QR) and R folded into V;
- V-step: V = Uᵀ (T − S) (the metric cancels when U is fixed and orthonormal);
- S-step (hard thresholding): S's support is the c largest entries of the S-subproblem's dense
  minimiser R = T − U V, scaled by √diag(G) (a gradient step with the Jacobi preconditioner lands
  exactly there); its values are refitted on that support (per row G[Ω,Ω] s = (R G)[Ω], by conjugate
  gradients on gathered blocks); the previous S is kept if it is still better;
- greedy bilateral rank growth: new directions from a few block power iterations on the residual's
  E G Eᵀ (m × m, never formed), orthogonal to U, with V's new rows Qᵀ E.
One m·d² product (T G) per layer; every other step costs d²·r or Σ|Ω_i|².
Everything is float64: activation Gram matrices are badly conditioned.

One solver in one file (about 350 lines): the three alternating steps share the metric G and its
factorisation, and are read and checked together against the objective above.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class Moments:
    """Calibration statistics of one layer (float64): G = X̂ X̂ᵀ, P = Y X̂ᵀ (None: X̂ = X, so P = W G), ‖Y‖²."""

    gram: torch.Tensor
    cross: torch.Tensor | None
    yy: float
    n: int

    def target(self, weight: torch.Tensor, ridge: float = 1e-6) -> torch.Tensor:
        """T = P G⁻¹: the dense weight that best maps these inputs to the original outputs."""
        w = weight.detach().reshape(weight.shape[0], -1).double()
        if self.cross is None:
            return w
        g = regularised(self.gram, ridge)
        chol, info = torch.linalg.cholesky_ex(g)
        if int(info) == 0:
            return torch.cholesky_solve(self.cross.T, chol).T
        return torch.linalg.lstsq(g, self.cross.T).solution.T


def regularised(gram: torch.Tensor, ridge: float) -> torch.Tensor:
    """G + λ I with λ = ridge · mean(diag G): keeps the solves well posed (dead inputs, n < d)."""
    lam = ridge * float(gram.diagonal().mean().clamp_min(1e-30))
    return gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)


@dataclass
class Decomposition:
    u: torch.Tensor  # m × r
    v: torch.Tensor  # r × d
    s: torch.Tensor  # m × d, zero off the mask
    mask: torch.Tensor  # m × d bool
    history: list[float] = field(default_factory=list)  # objective after each S-step
    objective: float = 0.0  # tr(E G Eᵀ), E = T − U V − S
    reference: float = 1.0  # tr(T G Tᵀ)

    @property
    def relative_error(self) -> float:
        """‖(T − Ŵ) X‖ / ‖T X‖ on the calibration patches (weights: ‖T − Ŵ‖ / ‖T‖)."""
        return math.sqrt(max(self.objective, 0.0) / max(self.reference, 1e-300))

    @property
    def rank(self) -> int:
        return self.u.shape[1]

    @property
    def nnz(self) -> int:
        return int(self.mask.sum())

    def weight(self) -> torch.Tensor:
        return self.u @ self.v + self.s


def _top_mask(score: torch.Tensor, c: int) -> torch.Tensor:
    mask = torch.zeros(score.numel(), dtype=torch.bool)
    if c > 0:
        mask[score.flatten().topk(c).indices] = True
    return mask.reshape(score.shape)


def _row_blocks(mask: torch.Tensor, budget: int = 1 << 23) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Rows of a support grouped by size: (rows, padded column indices B × k, valid B × k) per group.

    Rows are sorted by their number of non-zeros so padding wastes little; each group's B·k² entries of
    G[Ω,Ω] blocks stay under `budget`.
    """
    counts = mask.sum(1)
    rows = torch.nonzero(counts).flatten()
    rows = rows[counts[rows].argsort()]
    order = torch.arange(mask.shape[1])
    groups, i = [], 0
    while i < rows.numel():
        k = int(counts[rows[i]])
        j = i + 1
        while j < rows.numel() and (j - i + 1) * int(counts[rows[j]]) ** 2 <= budget:
            j += 1
        sel = rows[i:j]
        k = int(counts[sel].max())
        key = torch.where(mask[sel], order, order + mask.shape[1])  # support columns first, in order
        idx = key.sort(1).indices[:, :k]
        groups.append((sel, idx, torch.gather(mask[sel], 1, idx)))
        i = j
    return groups


def _refit(g: torch.Tensor, diag: torch.Tensor, rg: torch.Tensor, mask: torch.Tensor, start: torch.Tensor | None,
           iters: int) -> tuple[torch.Tensor, float]:
    """Best values on a fixed support: G[Ω,Ω] s_Ω = (R G)[i, Ω] for every row i; returns S and Σ sᵀ G s.

    One Jacobi-preconditioned conjugate-gradient solve per row, batched over rows of similar support
    size with the G[Ω,Ω] blocks gathered once; warm started from `start` (the previous S). Costs
    Σ |Ω_i|² per iteration instead of the m·d² of a full S G product. Runs in g's dtype (the caller
    passes a float32 copy for large supports: a few CG steps do not need float64).
    """
    dt = g.dtype
    tiny = torch.finfo(dt).tiny
    s = torch.zeros_like(rg)
    quad = 0.0
    for rows, idx, valid in _row_blocks(mask):
        a = g[idx[:, :, None], idx[:, None, :]] * (valid[:, :, None] & valid[:, None, :])
        pre = torch.where(valid, diag.to(dt)[idx], 1.0)
        b = torch.where(valid, torch.gather(rg[rows].to(dt), 1, idx), 0.0)
        x = torch.where(valid, torch.gather(start[rows].to(dt), 1, idx), 0.0) if start is not None else b / pre
        res = b - torch.bmm(a, x.unsqueeze(2)).squeeze(2)
        z = res / pre
        p = z.clone()
        rz = (res * z).sum(1)
        floor = 1e-28 * float((b.double() ** 2 / pre.double()).sum())
        for _ in range(min(iters, idx.shape[1])):
            ap = torch.bmm(a, p.unsqueeze(2)).squeeze(2)
            den = (p * ap).sum(1)
            alpha = torch.where(den > 0, rz / den.clamp_min(tiny), 0.0)
            x += alpha[:, None] * p
            res -= alpha[:, None] * ap
            z = res / pre
            new = (res * z).sum(1)
            if float(new.double().sum()) <= floor:
                break
            p = z + torch.where(rz > 0, new / rz.clamp_min(tiny), 0.0)[:, None] * p
            rz = new
        x = x * valid
        quad += float((x.double() * torch.bmm(a, x.unsqueeze(2)).squeeze(2).double()).sum())
        s[rows.unsqueeze(1).expand_as(idx)[valid], idx[valid]] = x[valid].double()
    return s, quad


class _State:
    """U, V, S and the products with G that the steps share (G = None: weight-only, G = I)."""

    SMALL = 1 << 22  # Σ|Ω_i|² up to which the support's blocks are refitted in float64

    def __init__(self, t: torch.Tensor, gram: torch.Tensor | None, ridge: float, cg_iters: int) -> None:
        m, d = t.shape
        self.t = t
        self.g = None if gram is None else regularised(gram.double(), ridge)
        self.diag = torch.ones(d, dtype=torch.float64) if self.g is None else self.g.diagonal().clone()
        self.tg = t if self.g is None else t @ self.g  # T G, the one m·d² product
        self.reference = float((self.tg * t).sum())  # tr(T G Tᵀ)
        self.cg_iters = cg_iters
        self._g32: torch.Tensor | None = None
        self.u = t.new_zeros(m, 0)
        self.v = t.new_zeros(0, d)
        self.s = torch.zeros_like(t)
        self.mask = torch.zeros(m, d, dtype=torch.bool)
        self.quad = 0.0  # tr(S G Sᵀ) of the current S
        self.history: list[float] = []

    def _blocks_source(self, mask: torch.Tensor) -> torch.Tensor:
        """G, or a float32 copy of it when the support's blocks are large (memory traffic halves)."""
        if int((mask.sum(1) ** 2).sum()) <= self.SMALL:
            return self.g
        if self._g32 is None:
            self._g32 = self.g.float()
        return self._g32

    def gmul(self, a: torch.Tensor) -> torch.Tensor:
        """A G for a thin A (rows × d)."""
        return a if self.g is None else (self.g @ a.T).T

    def u_step(self) -> None:
        if self.u.shape[1] == 0:
            return
        vg = self.gmul(self.v)  # V G (r × d)
        a = (self.tg - (self.s if self.g is None else 0)) @ self.v.T
        if self.g is not None:
            a = a - self.s @ vg.T
        b = self.v @ vg.T
        b = b + 1e-12 * float(b.diagonal().mean().clamp_min(1e-30)) * torch.eye(b.shape[0], dtype=b.dtype)
        u = torch.linalg.solve(b, a.T).T  # U = (T − S) G Vᵀ (V G Vᵀ)⁻¹, b symmetric
        q, r = torch.linalg.qr(u)
        self.u, self.v = q, r @ self.v

    def v_step(self) -> None:
        if self.u.shape[1]:
            self.v = self.u.T @ (self.t - self.s)

    def s_step(self, c: int) -> None:
        r = self.t - self.u @ self.v
        if c == 0:
            return
        if self.g is None:  # weight-only: the c largest residual entries, exactly
            self.mask = _top_mask(r.abs(), c)
            self.s = r * self.mask
            self.history.append(float(((r - self.s) ** 2).sum()))
            return
        rg = self.tg - self.u @ self.gmul(self.v)  # (T − U V) G
        base = float((rg * r).sum())
        best = (base - 2 * float((self.s * rg).sum()) + self.quad, self.s, self.mask, self.quad)
        new = _top_mask(r.abs() * self.diag.sqrt(), c)  # largest entries of the dense minimiser, G-scaled
        s, quad = _refit(self._blocks_source(new), self.diag, rg, new, self.s, self.cg_iters)
        f = base - 2 * float((s * rg).sum()) + quad
        if f < best[0] or not self.mask.any():
            best = (f, s, new, quad)
        f, self.s, self.mask, self.quad = best
        self.history.append(f)

    def objective(self) -> float:
        """tr((T − U V − S) G (T − U V − S)ᵀ)."""
        r = self.t - self.u @ self.v
        if self.g is None:
            return float(((r - self.s) ** 2).sum())
        rg = self.tg - self.u @ self.gmul(self.v)
        return float((rg * r).sum()) - 2 * float((self.s * rg).sum()) + self.quad

    def grow(self, k: int, power_iters: int, gen: torch.Generator) -> None:
        """Add k rank-1 directions: the top of the residual's E G Eᵀ by block power iteration, orthogonal to U."""
        m = self.t.shape[0]
        k = min(k, m - self.u.shape[1])
        if k <= 0:
            return
        e = self.t - self.u @ self.v - self.s
        q = torch.randn(m, k, generator=gen, dtype=torch.float64)
        for _ in range(max(1, power_iters)):
            q = e @ (e.T @ q if self.g is None else self.g @ (e.T @ q))  # E G Eᵀ q
            if self.u.shape[1]:
                q = q - self.u @ (self.u.T @ q)
            q = torch.linalg.qr(q).Q
        self.u = torch.cat([self.u, q], 1)
        self.v = torch.cat([self.v, q.T @ e], 0)


def decompose(target: torch.Tensor, rank: int, nnz: int, gram: torch.Tensor | None = None, *, stages: int = 4,
              sweeps: int = 2, final_sweeps: int = 4, power_iters: int = 2, ridge: float = 1e-6, cg_iters: int = 12,
              seed: int = 0) -> Decomposition:
    """Minimise tr((T − U V − S) G (T − U V − S)ᵀ) over rank(U V) ≤ rank and ‖S‖₀ ≤ nnz (G=None: G = I).

    The rank grows greedily in `stages` steps, each followed by `sweeps` U- and V-steps (S stays 0
    while the rank grows: a sparse part fitted to a too-small low-rank part locks in a wrong support),
    then `final_sweeps` sweeps of U-, V- and S-steps fit all three.
    """
    t = target.detach().reshape(target.shape[0], -1).double().cpu()
    m, d = t.shape
    rank, nnz = min(int(rank), m, d), min(int(nnz), m * d)
    st = _State(t, None if gram is None else gram.cpu(), ridge, cg_iters)
    gen = torch.Generator().manual_seed(seed)
    goals = sorted({math.ceil(rank * (i + 1) / max(1, stages)) for i in range(max(1, stages))}) if rank else []
    for goal in goals:
        st.grow(goal - st.u.shape[1], power_iters, gen)
        for _ in range(sweeps):
            st.u_step()
            st.v_step()
    for _ in range(final_sweeps if nnz or goals else 0):
        st.u_step()
        st.v_step()
        st.s_step(nnz)
        if not nnz:
            st.history.append(st.objective())
        h = st.history
        if len(h) > 1 and h[-2] - h[-1] <= 1e-5 * abs(h[-2]):
            break  # S kept and U, V settled: nothing moves any more
    u, v = _balanced(st.u, st.v)
    return Decomposition(u, v, st.s, st.mask, st.history, st.objective(), st.reference)


def _balanced(u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same U V with both factors carrying √σ of each direction (an r × r SVD), so that SGD
    fine-tuning moves U and V at comparable rates (the solver leaves U orthonormal and V large)."""
    if u.shape[1] == 0:
        return u, v
    qv, rv = torch.linalg.qr(v.T)  # V = Rvᵀ Qvᵀ
    a, sig, bt = torch.linalg.svd(rv.T)  # U V = U a Σ bt Qvᵀ
    root = sig.sqrt()
    return u @ a * root, root[:, None] * (bt @ qv.T)


def weighted_error(w_hat: torch.Tensor, weight: torch.Tensor, mom: Moments | None) -> float:
    """Relative feature-map error ‖Y − Ŵ X̂‖ / ‖Y‖ on the calibration patches (weights: ‖W − Ŵ‖ / ‖W‖)."""
    w = weight.detach().reshape(weight.shape[0], -1).double()
    wh = w_hat.detach().reshape(w.shape).double()
    if mom is None:
        return float((w - wh).norm() / w.norm().clamp_min(1e-30))
    g = mom.gram.double()
    p = w @ g if mom.cross is None else mom.cross
    err = mom.yy - 2 * float((p * wh).sum()) + float(((wh @ g) * wh).sum())
    return math.sqrt(max(err, 0.0) / max(mom.yy, 1e-30))


def lowrank_curve(t: torch.Tensor, gram: torch.Tensor | None, ridge: float = 1e-6) -> torch.Tensor:
    """Relative squared error of the best rank-r fit in the metric G, for r = 0..m (from T G Tᵀ's eigenvalues).

    Used only to split a global budget across layers, so one m × m eigendecomposition per layer is fine.
    """
    t = t.reshape(t.shape[0], -1).double()
    a = t @ (t.T if gram is None else regularised(gram.double(), ridge) @ t.T)
    ev = torch.linalg.eigvalsh(a).flip(0).clamp_min(0)
    total = float(ev.sum()) or 1.0
    tail = torch.cat([ev.flip(0).cumsum(0).flip(0), ev.new_zeros(1)])
    return tail / total


def allocate(curves: list[torch.Tensor], unit_costs: list[float], caps: list[int], budget: float,
             floor: list[int] | None = None) -> list[int]:
    """Ranks r_l minimising Σ curve_l(r_l) subject to Σ r_l · unit_cost_l ≤ budget, r_l ≤ cap_l.

    Greedy on error decrease per parameter: each step buys the next rank unit of the layer whose error
    falls fastest per parameter spent. The curves come from sorted eigenvalues (convex), so greedy is
    optimal up to the last unit.
    """
    import heapq

    ranks = list(floor) if floor is not None else [min(1, c) for c in caps]
    spent = sum(r * c for r, c in zip(ranks, unit_costs, strict=True))
    heap = []
    for i, (curve, cost) in enumerate(zip(curves, unit_costs, strict=True)):
        if ranks[i] < caps[i]:
            heapq.heappush(heap, (-float(curve[ranks[i]] - curve[ranks[i] + 1]) / cost, i))
    while heap:
        _, i = heapq.heappop(heap)
        if spent + unit_costs[i] > budget:
            continue
        ranks[i] += 1
        spent += unit_costs[i]
        if ranks[i] < caps[i]:
            heapq.heappush(heap, (-float(curves[i][ranks[i]] - curves[i][ranks[i] + 1]) / unit_costs[i], i))
    return ranks


__all__ = ["Moments", "Decomposition", "decompose", "weighted_error", "lowrank_curve", "allocate", "regularised"]
