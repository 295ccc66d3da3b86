"""Batched convex quadratic programs, solved by a primal-dual interior-point method and differentiable through
their solution: the differentiable optimisation layer of MetaOptNet (Lee et al. 2019), after OptNet (Amos and
Kolter, ICML 2017, "OptNet: Differentiable Optimization as a Layer in Neural Networks").

Each task of a batch is the problem qpth solves,

    minimise 1/2 z^T Q z + p^T z   subject to   G z <= h,   A z = b,

with Q [B, n, n] positive semi-definite, G [B, m, n] (or None for the identity, z <= h, which the SVM dual uses
and which skips forming G^T D G), A [B, e, n] (or None: no equality constraints).

Solver: Mehrotra's predictor-corrector primal-dual interior-point method (as qpth's `pdipm_b` and CVXOPT), on
slack s >= 0 and multipliers lambda >= 0, nu. Each iteration factors (LU) the KKT matrix with s and lambda
eliminated, [[Q + G^T D G, A^T], [A, 0]] with D = diag(lambda/s) (for a general G, its equivalent augmented form:
see `_ReducedKKT`), once, and solves it twice (affine, then centred-corrected direction); steps stop at 0.99 of
the distance to the boundary of s, lambda >= 0. The starting point is CVXOPT's (a least
squares solve, then slack and multipliers shifted to be positive). A task stops moving once it has converged
(residuals and mean complementarity under `tol`); the loop ends when every task has or after `max_iter`
iterations, so a small fixed `max_iter` (MetaOptNet trains with 15, tests with 3) gives an approximate solution,
as it does in qpth.

Gradients: implicit differentiation of the KKT conditions at the returned point (OptNet, section 3): with g the
gradient of the loss in z, solve [[Q + G^T D G, A^T], [A, 0]] [x; y] = [-g; 0] (D = diag(lambda/s), the same
matrix as the last iteration: the KKT system with lambda's rows eliminated), then dp = x, dQ = sym(x z^T),
dG = lambda x^T + w z^T and dh = -w with w = D G x, dA = nu x^T + y z^T, db = -y. The reduced matrix must be
non-singular: Q positive definite on the null space of A (MetaOptNet adds a ridge to Q for the same reason).

Why not a library: qpth (MetaOptNet's dependency) is unmaintained and pins old torch releases; cvxpylayers pulls
in cvxpy and external conic solvers, runs them on the CPU one problem at a time, and gives no float32 GPU path.
This solver is plain batched torch (any device, float32 or float64) in a couple of hundred lines.
Tests check it against exhaustive active-set enumeration and its gradients against finite differences."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

STEP_FRACTION = 0.99
"""Fraction of the largest step that keeps slack and multipliers non-negative (qpth uses 0.999)."""


@dataclass(frozen=True)
class QPSolution:
    """A solver's point: primal z [B, n], slack s [B, m] (G z + s = h), multipliers lam [B, m] of the
    inequalities and nu [B, e] of the equalities, and the number of iterations run."""

    z: Tensor
    s: Tensor
    lam: Tensor
    nu: Tensor
    iterations: int


def default_tol(dtype: torch.dtype) -> float:
    """Convergence tolerance for a dtype: tight in float64 (for gradient checks), loose enough in float32. A task
    has converged when its mean complementarity s.lam / m and the largest entry of each residual (stationarity,
    G z + s - h, A z - b) are at most tol times (1 + the largest entry among that residual's terms). Any tol is
    raised to 10 machine epsilons: past that floor an interior-point iteration only amplifies rounding."""
    return 1e-12 if dtype == torch.float64 else 1e-6


def _g(G: Tensor | None, z: Tensor) -> Tensor:
    """G z, batched; z itself for the identity."""
    return z if G is None else (G @ z.unsqueeze(-1)).squeeze(-1)


def _gt(G: Tensor | None, w: Tensor) -> Tensor:
    """G^T w, batched; w itself for the identity."""
    return w if G is None else (G.mT @ w.unsqueeze(-1)).squeeze(-1)


def _matvec(M: Tensor, v: Tensor) -> Tensor:
    return (M @ v.unsqueeze(-1)).squeeze(-1)


class _ReducedKKT:
    """Solves (Q + G^T diag(d) G) x + A^T y = r1, A x = r2 for x [B, n], y [B, e], factoring (LU) once.

    With G the identity the matrix is formed as is ([[Q + diag(d), A^T], [A, 0]]): large d (active constraints
    near the solution) only dominates its own diagonal entry. A general G instead gets the equivalent augmented
    system [[Q, G^T, A^T], [G, -diag(1/d), 0], [A, 0, 0]] [x; u; y] = [r1; 0; r2] (u = D G x), as qpth's
    factorisation does: forming G^T D G would add huge rank-one terms that wipe out Q in float32."""

    def __init__(self, Q: Tensor, G: Tensor | None, A: Tensor | None, d: Tensor) -> None:
        if G is None:
            blocks = [[Q + torch.diag_embed(d)]]
        else:
            blocks = [[Q, G.mT], [G, torch.diag_embed(-1 / d)]]
        if A is not None:
            for row in blocks:  # A^T beside Q, zeros beside the G row
                row.append(A.mT if row[0] is blocks[0][0] else A.new_zeros(row[0].shape[:-1] + (A.shape[-2],)))
            blocks.append([A] + [A.new_zeros(A.shape[:-1] + (row[0].shape[-2],)) for row in blocks[1:]]
                          + [A.new_zeros(A.shape[:-1] + (A.shape[-2],))])
        matrix = torch.cat([torch.cat(row, -1) for row in blocks], -2)
        self.n, self.m, self.d = Q.shape[-1], (0 if G is None else G.shape[-2]), d
        self.lu, self.pivots, info = torch.linalg.lu_factor_ex(matrix)
        if bool((info > 0).any()):
            raise ValueError("the QP's KKT matrix is singular: Q must be positive definite on the null space of "
                             "A (add a small ridge to Q)")

    def solve(self, r1: Tensor, r2: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
        """x, u = diag(d) G x (read from the augmented solution for a general G: recomputing it from x would
        multiply x's rounding error by the huge d of active constraints) and y (None without equalities)."""
        parts = [r1] + ([r1.new_zeros(r1.shape[:-1] + (self.m,))] if self.m else []) + ([] if r2 is None else [r2])
        x = torch.linalg.lu_solve(self.lu, self.pivots, torch.cat(parts, -1).unsqueeze(-1)).squeeze(-1)
        u = self.d * x[..., :self.n] if self.m == 0 else x[..., self.n:self.n + self.m]
        return x[..., :self.n], u, (None if r2 is None else x[..., self.n + self.m:])


def _size(terms: list[Tensor]) -> Tensor:
    """The largest magnitude among the terms of a residual, per task: residuals are judged relative to it."""
    return torch.stack([t.abs().amax(-1) for t in terms]).amax(0)


def _largest_step(x: Tensor, dx: Tensor) -> Tensor:
    """Per task, the largest alpha with x + alpha dx >= 0 (infinite when dx >= 0): [B, m] -> [B]."""
    ratio = torch.where(dx < 0, -x / dx.clamp(max=-torch.finfo(dx.dtype).tiny), torch.full_like(x, float("inf")))
    return ratio.amin(-1) if ratio.shape[-1] else x.new_full(x.shape[:-1], float("inf"))


def _newton_direction(kkt: _ReducedKKT, G: Tensor | None, s: Tensor, lam: Tensor, rx: Tensor, rz: Tensor,
                      ry: Tensor | None, rc: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """The Newton step (dz, ds, dlam, dnu) that zeroes the linearised residuals rx (stationarity), rz (G z + s - h),
    ry (A z - b) and rc (lam * s minus its target), eliminating ds and dlam:
    (Q + G^T D G) dz + A^T dnu = -rx - G^T w, A dz = -ry, with D = lam / s and w = (lam rz - rc) / s."""
    w = (lam * rz - rc) / s
    dz, u, dnu = kkt.solve(-rx - _gt(G, w), None if ry is None else -ry)
    return dz, -rz - _g(G, dz), w + u, dnu


@torch.no_grad()
def interior_point(Q: Tensor, p: Tensor, G: Tensor | None, h: Tensor, A: Tensor | None = None,
                   b: Tensor | None = None, max_iter: int = 20, tol: float | None = None) -> QPSolution:
    """Solve a batch of QPs (module docstring) without gradients; shapes Q [B, n, n], p [B, n], G [B, m, n] or
    None (identity, m = n), h [B, m], A [B, e, n] or None, b [B, e]. Every input has the batch dimension."""
    if h.shape[-1] == 0:
        raise ValueError("the QP has no inequality constraints: solve its KKT system directly")
    tol = max(default_tol(Q.dtype) if tol is None else tol, 10 * torch.finfo(Q.dtype).eps)
    Q = 0.5 * (Q + Q.mT)
    equality = A is not None
    # Start (CVXOPT): minimise 1/2 z^T Q z + p^T z + 1/2 |G z - h|^2 subject to A z = b, then shift.
    z, _, nu = _ReducedKKT(Q, G, A, torch.ones_like(h)).solve(-p + _gt(G, h), b if equality else None)
    residual = _g(G, z) - h
    s, lam = -residual, residual.clone()
    for v in (s, lam):  # CVXOPT's rule: a vector with an entry <= 0 is shifted so that its smallest entry is 1
        lowest = v.amin(-1, keepdim=True)
        v.add_(torch.where(lowest <= 0, 1 - lowest, torch.zeros_like(lowest)))
    nu = nu if equality else z.new_zeros(z.shape[:-1] + (0,))
    iterations = 0
    for iterations in range(1, max_iter + 1):  # noqa: B007 (the count is returned)
        terms_x = [_matvec(Q, z), p, _gt(G, lam)] + ([_matvec(A.mT, nu)] if equality else [])
        terms_z = [_g(G, z), s, -h]
        terms_y = [_matvec(A, z), -b] if equality else []
        mu = (s * lam).mean(-1)
        converged = mu <= tol * (1 + _size(terms_z))
        for terms in (terms_x, terms_z, terms_y):
            if terms and terms[0].shape[-1]:
                converged &= sum(terms[1:], terms[0]).abs().amax(-1) <= tol * (1 + _size(terms))
        if bool(converged.all()):
            iterations -= 1
            break
        rx, rz = sum(terms_x[1:], terms_x[0]), sum(terms_z[1:], terms_z[0])
        ry = sum(terms_y[1:], terms_y[0]) if equality else None
        kkt = _ReducedKKT(Q, G, A, lam / s)
        _, ds_aff, dlam_aff, _ = _newton_direction(kkt, G, s, lam, rx, rz, ry, s * lam)  # predictor (affine)
        alpha = torch.minimum(_largest_step(s, ds_aff), _largest_step(lam, dlam_aff)).clamp(max=1).unsqueeze(-1)
        mu_aff = ((s + alpha * ds_aff) * (lam + alpha * dlam_aff)).mean(-1)
        sigma = (mu_aff / mu).clamp(0, 1) ** 3
        target = s * lam + ds_aff * dlam_aff - (sigma * mu).unsqueeze(-1)  # centring and Mehrotra's correction
        dz, ds, dlam, dnu = _newton_direction(kkt, G, s, lam, rx, rz, ry, target)
        alpha = (STEP_FRACTION * torch.minimum(_largest_step(s, ds), _largest_step(lam, dlam))).clamp(max=1)
        alpha = torch.where(converged, torch.zeros_like(alpha), alpha).unsqueeze(-1)
        z, s, lam = z + alpha * dz, s + alpha * ds, lam + alpha * dlam
        if equality:
            nu = nu + alpha * dnu
    return QPSolution(z, s, lam, nu, iterations)


class _QPFunction(torch.autograd.Function):
    """z(Q, p, G, h, A, b) with the KKT implicit gradient (module docstring); G and A may be None."""

    @staticmethod
    def forward(ctx: Any, Q: Tensor, p: Tensor, G: Tensor | None, h: Tensor, A: Tensor | None, b: Tensor | None,
                max_iter: int, tol: float | None) -> Tensor:
        solution = interior_point(Q, p, G, h, A, b, max_iter, tol)
        ctx.save_for_backward(0.5 * (Q + Q.mT), G, A, solution.z, solution.s, solution.lam, solution.nu)
        return solution.z

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_z: Tensor) -> tuple[Tensor | None, ...]:
        Q, G, A, z, s, lam, nu = ctx.saved_tensors
        x, w, y = _ReducedKKT(Q, G, A, lam / s).solve(-grad_z, None if A is None else grad_z.new_zeros(nu.shape))
        need = ctx.needs_input_grad
        grad_Q = 0.5 * (x.unsqueeze(-1) * z.unsqueeze(-2) + z.unsqueeze(-1) * x.unsqueeze(-2)) if need[0] else None
        grad_p = x if need[1] else None
        grad_G = lam.unsqueeze(-1) * x.unsqueeze(-2) + w.unsqueeze(-1) * z.unsqueeze(-2) if need[2] else None
        grad_h = -w if need[3] else None
        grad_A = nu.unsqueeze(-1) * x.unsqueeze(-2) + y.unsqueeze(-1) * z.unsqueeze(-2) if need[4] else None
        grad_b = -y if need[5] else None
        return grad_Q, grad_p, grad_G, grad_h, grad_A, grad_b, None, None


def solve_qp(Q: Tensor, p: Tensor, G: Tensor | None, h: Tensor, A: Tensor | None = None, b: Tensor | None = None,
             max_iter: int = 20, tol: float | None = None) -> Tensor:
    """The solutions z [B, n] of a batch of QPs (module docstring), differentiable in every tensor input.

    Inputs without the batch dimension (Q [n, n], p [n], G [m, n], h [m], A [e, n], b [e]) are shared by every
    task; the batch size is the largest given. G None means the identity (z <= h); A None, no equalities.
    `max_iter` caps the interior-point iterations; `tol` (default by dtype) stops a task earlier."""
    if (A is None) != (b is None):
        raise ValueError("give A and b together (equality constraints A z = b), or neither")
    if max_iter < 1:
        raise ValueError(f"max_iter must be at least 1, got {max_iter}")
    dims = {"Q": (Q, 2), "p": (p, 1), "G": (G, 2), "h": (h, 1), "A": (A, 2), "b": (b, 1)}
    batch = max((t.shape[0] for t, k in dims.values() if t is not None and t.dim() == k + 1), default=None)
    squeeze = batch is None
    batch = batch or 1

    def batched(t: Tensor | None, k: int) -> Tensor | None:
        if t is None:
            return None
        t = t.to(Q.dtype)
        return t.expand(batch, *t.shape) if t.dim() == k else t.expand(batch, *t.shape[1:])

    Q, p, G, h, A, b = (batched(t, k) for t, k in dims.values())
    n = Q.shape[-1]
    if p.shape[-1] != n or (G is None and h.shape[-1] != n) or (G is not None and G.shape[-1] != n) \
            or (A is not None and A.shape[-1] != n):
        raise ValueError(f"QP shapes disagree: Q {tuple(Q.shape)}, p {tuple(p.shape)}, G "
                         f"{None if G is None else tuple(G.shape)}, h {tuple(h.shape)}, A "
                         f"{None if A is None else tuple(A.shape)}")
    z = _QPFunction.apply(Q, p, G, h, A, b, max_iter, tol)
    return z[0] if squeeze else z
