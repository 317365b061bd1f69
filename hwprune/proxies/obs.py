"""Structured Optimal Brain Surgeon maths (ZipLM-style), shared by every family's ``obs`` proxy.

For an output projection ``y = W x + b`` (W: (out, n)) the loss of a kept column set K is
``E||W x + b - (W' x_K + b')||^2``, a quadratic with Hessian H = E[x x^T] (ZipLM writes 2/N sum x x^T;
the factor 2 changes neither the order nor the updates, so errors here are plain mean squared errors).
Greedily remove the group G (a head's head_dim columns, or one neuron) with the least
``trace(W_G (Hinv_GG)^-1 W_G^T)``, then update ``W -= W_G (Hinv_GG)^-1 Hinv_G,:`` and Hinv alike.

Centred, with bias: the bias is free, so the best (W', b') is the least-squares fit on *centred*
inputs plus ``b' = b + W mu - W' mu_K`` -- the same as uncentred OBS on inputs augmented by a constant
1 whose weight (the bias) is never removed. Using the covariance instead of E[x x^T] is therefore
never worse, and with FLAP's mean term it is the same compensation FLAP uses, taken to optimum.

A quadratic's OBS steps end at the least-squares optimum of the kept set, so a level is rebuilt on
demand as ``W Hd[:, K] Hd[K, K]^-1`` (Hd the damped covariance) instead of storing every level.

Speed: neurons are removed in rounds. Each round takes the ``block`` fraction of remaining neurons
with the smallest OBS error, orders them by exact sequential OBS inside that block (their errors
depend only on the block's columns of W and block of Hinv), then applies the block's joint update -- equal to the
sequential updates -- once. ``block=0`` is the plain one-at-a-time greedy. Heads always go one at a time.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

__all__ = [
    "obs_order",
    "ls_weights",
    "ls_weights_rows",
    "ls_weights_blocks",
    "damped",
    "symmetrize_",
    "cholesky_",
    "inverse_spd_",
]

_BLOCK = 1024  # rows per block of the in-place helpers: their temporaries are a few MB, never width^2


def symmetrize_(a: torch.Tensor, block: int = _BLOCK) -> torch.Tensor:
    """``a <- (a + a^T) / 2`` in place, block by block: the same numbers as the out-of-place sum, with
    one block^2 temporary instead of a width^2 one (268 MB for an 8192-wide float32 matrix)."""
    n = a.shape[0]
    for i in range(0, n, block):
        for j in range(i, n, block):
            t = (a[i : i + block, j : j + block] + a[j : j + block, i : i + block].T).mul_(0.5)
            a[i : i + block, j : j + block] = t
            if i != j:
                a[j : j + block, i : i + block] = t.T
    return a


def _lapack(name: str, a: torch.Tensor) -> object:
    from scipy.linalg import lapack  # scipy ships its own LAPACK; imported only where a routine runs

    prefix = {torch.float32: "s", torch.float64: "d"}[a.dtype]
    return getattr(lapack, prefix + name)


def cholesky_(a: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factor of the symmetric positive-definite ``a``, written over ``a``'s own lower
    triangle (no second width^2 buffer). The strict upper triangle keeps stale values: pass the result
    only to routines that read the lower triangle (``torch.cholesky_solve(b, L)``, :func:`inverse_spd_`)."""
    if not a.is_contiguous():
        raise ValueError("cholesky_ needs a contiguous matrix")
    # a C-ordered lower triangle is the transposed (Fortran) array's upper one: potrf(lower=0) on a.T
    _, info = _lapack("potrf", a)(a.numpy().T, lower=0, clean=0, overwrite_a=1)  # type: ignore[operator]
    if info != 0:
        raise torch.linalg.LinAlgError(f"the matrix is not positive-definite (leading minor {info}); raise the damping")
    return a


def inverse_spd_(a: torch.Tensor, block: int = _BLOCK) -> torch.Tensor:
    """Inverse of the symmetric positive-definite ``a``, in ``a``'s own storage (Cholesky, then LAPACK's
    potri, then the lower triangle mirrored block by block): one width^2 buffer where
    ``cholesky`` + ``cholesky_inverse`` hold three at their peak."""
    cholesky_(a)
    _, info = _lapack("potri", a)(a.numpy().T, lower=0, overwrite_c=1)  # type: ignore[operator]
    if info != 0:
        raise torch.linalg.LinAlgError(f"the Cholesky factor is singular (diagonal entry {info})")
    n = a.shape[0]
    for i in range(0, n, block):  # lower triangle -> upper, block by block
        d = a[i : i + block, i : i + block]
        d.copy_(torch.tril(d) + torch.tril(d, -1).T)
        for j in range(i + block, n, block):
            a[i : i + block, j : j + block] = a[j : j + block, i : i + block].T
    return a


def _take_(a: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, block: int = 256) -> torch.Tensor:
    """``a[rows][:, cols]`` written into ``a``'s own storage (rows and cols increasing), returned as a
    contiguous view. Safe in place: row i of the result lands at or before where source row rows[i]
    starts, and the rows still to be read start after everything written so far."""
    assert a.is_contiguous()
    flat, nc = a.view(-1), len(cols)
    for i in range(0, len(rows), block):
        t = a[rows[i : i + block]][:, cols]
        flat[i * nc : i * nc + t.numel()] = t.reshape(-1)
    return flat[: len(rows) * nc].view(len(rows), nc)


def damped(cov: torch.Tensor, damp: float, *, inplace: bool = False) -> torch.Tensor:
    """cov + damp * mean(diag) * I: keeps the inverse finite for dead or collinear channels.

    ``inplace=True`` adds to ``cov``'s own diagonal (no width^2 copy)."""
    lam = damp * float(torch.diagonal(cov).mean().clamp_min(1e-12))
    out = cov if inplace else cov.clone()
    out.diagonal().add_(lam)
    return out


def _group_errors(w: torch.Tensor, hinv: torch.Tensor, g: int) -> torch.Tensor:
    """OBS error of removing each of the k groups of ``g`` columns: trace(W_G (Hinv_GG)^-1 W_G^T)."""
    if g == 1:
        return w.square().sum(0) / torch.diagonal(hinv)
    k = w.shape[1] // g
    idx = torch.arange(k)
    blocks = hinv.reshape(k, g, k, g)[idx, :, idx, :]  # (k, g, g)
    wb = w.reshape(w.shape[0], k, g).permute(1, 0, 2)  # (k, out, g)
    return (torch.linalg.solve(blocks, wb.transpose(1, 2)).transpose(1, 2) * wb).sum((1, 2))


def _block_order(w: np.ndarray, h: np.ndarray) -> tuple[list[int], list[float]]:
    """Exact sequential OBS over a few single columns: only the block's W and Hinv change their errors.

    Small matrices, many steps: numpy's per-call cost is a fraction of torch's here.
    """
    w, h = w.copy(), h.copy()
    alive = np.ones(w.shape[1], dtype=bool)
    order, errs = [], []
    for _ in range(w.shape[1]):
        e = np.where(alive, (w * w).sum(0) / np.diagonal(h), np.inf)
        j = int(np.argmin(e))
        order.append(j)
        errs.append(max(float(e[j]), 0.0))
        alive[j] = False
        row = h[j] / h[j, j]
        w -= np.outer(w[:, j], row)
        h -= np.outer(h[:, j], row)
        h[j, j] = 1.0  # column j is now zero in W; a unit pivot keeps its (masked) error finite
    return order, errs


def obs_order(
    weight: torch.Tensor,
    hinv: torch.Tensor,
    *,
    granule: int = 1,
    stop: int = 0,
    block: float = 0.02,
    overwrite: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Greedy structured OBS down to ``stop`` kept groups.

    Returns (order of all groups, least important first; error of each removal step). The steps'
    errors add up to the least-squares error of the kept set. ``overwrite=True`` lets the loop work in
    ``weight`` and ``hinv`` themselves (no copies: one width^2 buffer less for very wide layers).
    """
    w, h = (weight.contiguous(), hinv.contiguous()) if overwrite else (weight.clone(), hinv.clone())
    ids = torch.arange(weight.shape[1] // granule)  # group id of each stored group slot
    dead = torch.zeros(len(ids), dtype=torch.bool)  # removed groups stay stored until compaction
    order: list[int] = []
    steps: list[float] = []
    while (k := int((~dead).sum())) > stop:
        err = _group_errors(w, h, granule).masked_fill(dead, float("inf"))
        s = 1 if granule > 1 or block <= 0 else max(1, int(block * k))
        pick = torch.argsort(err)[: min(s, k - stop)]
        cols = (pick[:, None] * granule + torch.arange(granule)).reshape(-1)
        if len(pick) == 1:
            order.append(int(ids[pick[0]]))
            steps.append(max(float(err[pick[0]]), 0.0))
        else:  # single columns only (heads go one at a time)
            local, errs = _block_order(w[:, cols].numpy(), h[cols][:, cols].numpy())
            order.extend(int(ids[pick[i]]) for i in local)
            steps.extend(errs)
        # joint update, in place over all stored slots (rank len(cols), BLAS-3); dead slots go stale
        solved = torch.linalg.solve(h[cols][:, cols], h[cols])
        w.addmm_(w[:, cols], solved, alpha=-1.0)
        h.addmm_(h[:, cols], solved, alpha=-1.0)
        dead[pick] = True
        # compact when a quarter is dead, so cost follows the live size; heads at once, since a dead
        # head's Hinv block is singular and would break the batched solve in _group_errors
        if granule > 1 or int(dead.sum()) * 4 >= len(dead) or k - len(pick) <= stop:
            live = (~dead).nonzero().squeeze(1)
            lc = (live[:, None] * granule + torch.arange(granule)).reshape(-1)
            if overwrite:  # compact in the buffers themselves: no second width^2 matrix
                w, h = _take_(w, torch.arange(w.shape[0]), lc), symmetrize_(_take_(h, lc, lc))
            else:
                w, h = w[:, lc], h[lc][:, lc]
                h = (h + h.T) / 2
            ids, dead = ids[live], dead[live]
    if len(ids):  # never removed: least useful first, so the order stays a full permutation
        rest = torch.argsort(_group_errors(w, h, granule)).tolist()
        order.extend(int(ids[i]) for i in rest)
    return np.asarray(order, dtype=np.int64), np.asarray(steps)


def ls_weights(weight: torch.Tensor, hd: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """argmin_W' trace((W - W'_K) Hd (W - W'_K)^T) with W' zero outside ``cols``: W Hd[:,K] Hd[K,K]^-1."""
    return ls_weights_rows(weight, hd[cols], cols)


def ls_weights_rows(weight: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """:func:`ls_weights` from ``rows = Hd[cols]`` only (len(cols) x in): a caller that builds Hd for this
    one solve can drop it before the Cholesky (on an 8192-wide projection, 268 MB of float32)."""
    return ls_weights_blocks(weight, [(0, rows)], cols)


def ls_weights_blocks(
    weight: torch.Tensor, blocks: Iterable[tuple[int, torch.Tensor]], cols: torch.Tensor
) -> torch.Tensor:
    """:func:`ls_weights` from ``Hd[cols]`` given a few rows at a time: ``blocks`` yields ``(start,
    Hd[cols[start:start + n]])``. Only the kept square ``Hd[K, K]`` (factored in place) and
    ``Hd[K, :] W^T`` are ever whole, so the rows can stream from disk; the solve overwrites the latter,
    which is returned (out, len(cols)), contiguous."""
    k = len(cols)
    sq = weight.new_empty(k, k)
    # the right-hand side Hd[K,:] W^T stored transposed, (out, k) C-ordered: LAPACK's (k, out) Fortran
    # array, so potrs solves it in place and the solution is already the new weight, contiguous
    out = weight.new_empty(weight.shape[0], k)
    for start, r in blocks:
        n = r.shape[0]
        sq[start : start + n] = r[:, cols]
        out[:, start : start + n] = weight @ r.T
    cholesky_(sq)
    b = out.numpy().T
    x, info = _lapack("potrs", sq)(sq.numpy().T, b, lower=0, overwrite_b=1)  # type: ignore[operator]
    if info != 0:
        raise ValueError(f"potrs: illegal argument {-info}")  # a bug here, not a property of the input
    if not np.shares_memory(x, b):  # f2py copied after all (it should not for a Fortran array)
        out.copy_(torch.from_numpy(x.T))
    return out
