"""GreBdec: W ≈ U V + S fitted to a layer's output feature maps, from second moments only.

With calibration inputs X̂ (d × n im2col patches, what the layer will see) and the original outputs
Y (m × n), ‖Y − Ŵ X̂‖² = ‖Y‖² − 2 tr(P Ŵᵀ) + tr(Ŵ G Ŵᵀ) with G = X̂ X̂ᵀ and P = Y X̂ᵀ. Writing
T = P G⁻¹ (T = W when X̂ are the original inputs), this is a constant plus tr((T − Ŵ) G (T − Ŵ)ᵀ):
a weighted Frobenius problem in the metric G, so nothing of size n is ever kept. G = I gives the
weight-only variant ‖W − U V − S‖².

Alternating minimisation, all closed form (no SVD):
- U-step: U = (T − S) G Vᵀ (V G Vᵀ)⁻¹, then U is orthonormalised (QR) and R folded into V;
- V-step: V = Uᵀ (T − S) (the metric cancels when U is fixed and orthonormal);
- S-step (hard thresholding pursuit): a Jacobi-preconditioned gradient step on S, keep the c largest
  (scaled) entries, refit the kept values exactly per row (G[Ω,Ω] s = ((T − U V) G)[Ω]); the support
  of the dense minimiser's largest scaled entries is tried too and the better one kept;
- greedy bilateral rank growth: new directions from a few block power iterations on the residual's
  E G Eᵀ (m × m), orthogonal to U, with V's new rows Qᵀ E.
Everything is float64: activation Gram matrices are badly conditioned.
"""

from __future__ import annotations

import math
from collections.abc import Callable
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
        w = weight.reshape(weight.shape[0], -1).double()
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
    history: list[float] = field(default_factory=list)  # objective after each S-step / sweep

    @property
    def rank(self) -> int:
        return self.u.shape[1]

    @property
    def nnz(self) -> int:
        return int(self.mask.sum())

    def weight(self) -> torch.Tensor:
        return self.u @ self.v + self.s


class _Metric:
    """Products with G (or with I for the weight-only objective), and G's Jacobi scaling."""

    def __init__(self, gram: torch.Tensor | None, d: int, ridge: float) -> None:
        self.g = None if gram is None else regularised(gram.double(), ridge)
        if self.g is None:
            self.diag = torch.ones(d, dtype=torch.float64)
            self.step = 1.0
        else:
            self.diag = self.g.diagonal().clone()
            self.step = 1.0 / _top_eigenvalue(self.g / torch.outer(self.diag.sqrt(), self.diag.sqrt()))

    def mul(self, a: torch.Tensor) -> torch.Tensor:
        return a if self.g is None else a @ self.g

    def smul(self, s: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """S G for a sparse S (dense product when S is not sparse enough to gain)."""
        if self.g is None:
            return s
        if float(mask.float().mean()) > 0.2:
            return s @ self.g
        return torch.sparse.mm(s.to_sparse_csr(), self.g)


def _top_eigenvalue(a: torch.Tensor, iters: int = 50) -> float:
    x = torch.ones(a.shape[0], dtype=a.dtype) / math.sqrt(a.shape[0])
    lam = 1.0
    for _ in range(iters):
        y = a @ x
        lam = float(y.norm())
        if lam == 0:
            return 1.0
        x = y / lam
    return lam * 1.01  # a little above: the power iteration approaches from below


def _top_mask(score: torch.Tensor, c: int) -> torch.Tensor:
    mask = torch.zeros(score.numel(), dtype=torch.bool)
    if c > 0:
        mask[score.flatten().topk(c).indices] = True
    return mask.reshape(score.shape)


def _refit(rg: torch.Tensor, mask: torch.Tensor, metric: _Metric, r: torch.Tensor, start: torch.Tensor | None = None,
           iters: int = 30) -> torch.Tensor:
    """Values on a fixed support: G[Ω,Ω] s_Ω = (R G)[i, Ω] for every row i at once.

    Jacobi-preconditioned conjugate gradients, one independent CG per row (row-wise step sizes), warm
    started from `start` (the previous S) where the support is kept; each iteration costs one sparse
    product S G (nnz · d), where direct solves would cost Σ |Ω_i|³ (rows of S are very uneven).
    """
    if metric.g is None:
        return r * mask
    g, diag = metric.g, metric.diag
    flat = mask.flatten().nonzero().flatten()
    if flat.numel() == 0:
        return torch.zeros_like(rg)
    counts = mask.sum(1)
    crow = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    col = flat % mask.shape[1]

    def apply(p: torch.Tensor) -> torch.Tensor:  # (P G) on the support, P zero off it
        sp = torch.sparse_csr_tensor(crow, col, p.flatten()[flat], size=p.shape)
        return torch.sparse.mm(sp, g) * mask

    b = rg * mask
    x = (b / diag) if start is None else torch.where(mask, start, b / diag)
    x = x * mask
    res = b - apply(x)
    z = res / diag
    p = z.clone()
    rz = (res * z).sum(1)
    scale = float((b * b / diag).sum().clamp_min(1e-300))
    for _ in range(min(iters, int(counts.max()))):
        ap = apply(p)
        den = (p * ap).sum(1)
        alpha = torch.where(den > 0, rz / den.clamp_min(1e-300), torch.zeros_like(den))
        x += alpha[:, None] * p
        res -= alpha[:, None] * ap
        z = res / diag
        rz_new = (res * z).sum(1)
        if float(rz_new.sum()) <= 1e-24 * scale:
            break
        beta = torch.where(rz > 0, rz_new / rz.clamp_min(1e-300), torch.zeros_like(rz))
        p = z + beta[:, None] * p
        rz = rz_new
    return x * mask


def _objective(eg: torch.Tensor, e: torch.Tensor) -> float:
    return float((eg * e).sum())


class _State:
    def __init__(self, t: torch.Tensor, metric: _Metric) -> None:
        self.t, self.metric = t, metric
        self.tg = metric.mul(t)
        m, d = t.shape
        self.u = t.new_zeros(m, 0)
        self.v = t.new_zeros(0, d)
        self.s = torch.zeros_like(t)
        self.mask = torch.zeros(m, d, dtype=torch.bool)
        self.history: list[float] = []

    def lowrank_g(self) -> torch.Tensor:
        """(U V) G, via V G (r × d)."""
        if self.u.shape[1] == 0:
            return torch.zeros_like(self.t)
        return self.u @ self.metric.mul(self.v)

    def residual(self) -> tuple[torch.Tensor, torch.Tensor]:
        """E = T − U V − S and E G."""
        e = self.t - self.u @ self.v - self.s
        eg = self.tg - self.lowrank_g() - self.metric.smul(self.s, self.mask)
        return e, eg

    def u_step(self) -> None:
        if self.u.shape[1] == 0:
            return
        gv = self.metric.mul(self.v).T  # d × r  (G Vᵀ)
        a = (self.t - self.s) @ gv
        b = self.v @ gv
        b = b + 1e-12 * float(b.diagonal().mean().clamp_min(1e-30)) * torch.eye(b.shape[0], dtype=b.dtype)
        u = torch.linalg.solve(b, a.T).T  # b is symmetric
        q, r = torch.linalg.qr(u)
        self.u, self.v = q, r @ self.v

    def v_step(self) -> None:
        if self.u.shape[1]:
            self.v = self.u.T @ (self.t - self.s)

    def s_step(self, c: int) -> None:
        if c == 0:
            return
        r = self.t - self.u @ self.v
        if self.metric.g is None:  # weight-only: the c largest residual entries, exactly
            self.mask = _top_mask(r.abs(), c)
            self.s = r * self.mask
            self.history.append(float(((r - self.s) ** 2).sum()))
            return
        rg = self.tg - self.lowrank_g()
        grad = rg - self.metric.smul(self.s, self.mask)  # (R − S) G, the descent direction
        before = _objective(grad, r - self.s)
        scale = self.metric.diag.sqrt()
        moved = (self.s + self.metric.step * grad / self.metric.diag) * scale
        best = (before, self.s, self.mask) if self.mask.any() else (math.inf, self.s, self.mask)
        first = _top_mask(moved.abs(), c)
        second = _top_mask((r * scale).abs(), c)  # r is the S-subproblem's dense minimiser
        for mask in (first,) if torch.equal(first, second) else (first, second):
            s = _refit(rg, mask, self.metric, r, self.s)
            f = _objective(rg - self.metric.smul(s, mask), r - s)
            if f < best[0]:
                best = (f, s, mask)
        _, self.s, self.mask = best
        self.history.append(best[0])

    def grow(self, k: int, power_iters: int, gen: torch.Generator) -> None:
        """Add k rank-1 directions: the top of the residual's E G Eᵀ by block power iteration."""
        m = self.t.shape[0]
        k = min(k, m - self.u.shape[1])
        if k <= 0:
            return
        e, eg = self.residual()
        gram = eg @ e.T  # m × m, E G Eᵀ
        q = torch.randn(m, k, generator=gen, dtype=torch.float64)
        for _ in range(max(1, power_iters)):
            q = gram @ q
            if self.u.shape[1]:
                q = q - self.u @ (self.u.T @ q)
            q = torch.linalg.qr(q).Q
        self.u = torch.cat([self.u, q], 1)
        self.v = torch.cat([self.v, q.T @ e], 0)


def decompose(target: torch.Tensor, rank: int, nnz: int, gram: torch.Tensor | None = None, *, stages: int = 4,
              sweeps: int = 2, final_sweeps: int = 4, power_iters: int = 2, ridge: float = 1e-6, seed: int = 0,
              log: Callable[[str], None] | None = None) -> Decomposition:
    """Minimise tr((T − U V − S) G (T − U V − S)ᵀ) over rank(U V) ≤ rank and ‖S‖₀ ≤ nnz (G=None: G = I).

    The rank grows greedily in `stages` steps (each followed by `sweeps` of U-, V- and S-steps), then
    `final_sweeps` more sweeps polish all three.
    """
    t = target.reshape(target.shape[0], -1).double().cpu()
    m, d = t.shape
    rank, nnz = min(int(rank), m, d), min(int(nnz), m * d)
    metric = _Metric(None if gram is None else gram.cpu(), d, ridge)
    st = _State(t, metric)
    gen = torch.Generator().manual_seed(seed)
    goals = sorted({math.ceil(rank * (i + 1) / max(1, stages)) for i in range(max(1, stages))}) if rank else []
    for goal in goals:
        st.grow(goal - st.u.shape[1], power_iters, gen)
        for _ in range(sweeps):
            st.u_step()
            st.v_step()
            st.s_step(nnz)
    for _ in range(final_sweeps):
        st.u_step()
        st.v_step()
        st.s_step(nnz)
    if log is not None and st.history:
        log(f"objective {st.history[0]:.4g} -> {st.history[-1]:.4g}")
    return Decomposition(st.u, st.v, st.s, st.mask, st.history)


def weighted_error(w_hat: torch.Tensor, weight: torch.Tensor, mom: Moments | None) -> float:
    """Relative feature-map error ‖Y − Ŵ X̂‖ / ‖Y‖ on the calibration patches (weights: ‖W − Ŵ‖ / ‖W‖)."""
    w = weight.reshape(weight.shape[0], -1).double()
    wh = w_hat.reshape(w.shape).double()
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
