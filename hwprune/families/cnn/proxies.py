"""CNN proxies: which channels of each coupled group to keep, what removing them costs, and the
reconstructed consumer weights.

Every proxy removes a group's channels in an order and measures the damage at the group's
*consumers* (the convs/linears reading it), on calibration images: the squared change of their
outputs over their output variance, summed over consumers -- the same unit for every group and every
proxy, so the DP can add them. Removal orders:

- ``magnitude``: group L2 -- every weight slice coupled to a channel (producer rows, consumer columns,
  depthwise filters, BN affine); data-free ranking, plain removal.
- ``bn_scale``: sum of |gamma| over the group's BatchNorms (network slimming); plain removal.
- ``flap``: fluctuation of the consumer input, sum over columns of Var(x) * ||W[:, col]||^2; the mean of
  what is removed is compensated (bias, or the BatchNorm re-estimation after surgery).
- ``obs`` (default): structured OBS over the consumers' unfolded inputs, removing channels in rounds of
  ~1/32 of the group; kept channels' weights are then refit by least squares,
  ``W' = W C[:, K] C[K, K]^-1`` (C the damped input covariance), per consumer.

After surgery every BatchNorm is re-estimated on the calibration images (see
:func:`~hwprune.families.cnn.calib.recalibrate_bn`); ``materialize`` returns those statistics as overrides
too, so whoever applies the plan + overrides gets the recalibrated model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from hwprune.families.cnn.adapter import CnnAdapter
from hwprune.families.cnn.calib import recalibrate_bn
from hwprune.families.cnn.graph import ChannelGroup
from hwprune.families.cnn.scorer import CnnScorer
from hwprune.proxies._base import CalibData, ProxyState, register_proxy
from hwprune.proxies.stats import num_threads
from hwprune.proxies.unfold import InputStats, collect_input_stats
from hwprune.space import Candidate, PruningSpace, Unit
from hwprune.surgery.plan import Plan

__all__ = ["CnnState", "CnnScorer", "Consumer", "fit_cnn_proxy", "fit_magnitude", "fit_bn_scale", "fit_flap", "fit_obs"]

_DAMP = 0.01


@dataclass
class Consumer:
    """One layer reading a group, restricted to the group's block of its unfolded input columns.

    A consumer may read several groups (a concatenation); each group sees and reconstructs only its
    own block, so the groups' decisions compose.
    """

    name: str
    weight: torch.Tensor  # (out, nb) float64: the dense weight's columns of this block
    cov: torch.Tensor  # (nb, nb) centred input covariance of the block
    mean: torch.Tensor  # (nb,)
    block: np.ndarray  # (nb,) ascending column indices of the block in the full unfolded input
    cols: np.ndarray  # (full, g): positions in ``block`` owned by each group channel
    energy: float  # E||W x - E W x||^2 of the whole consumer output (normaliser)
    shape: tuple[int, ...]  # the dense weight's shape, to fold reconstructed matrices back
    out_group: str | None


def _consumers(adapter: CnnAdapter, g: ChannelGroup, stats: dict[str, InputStats]) -> list[Consumer]:
    dense = adapter.dense()
    writes = {l.name: l.out_group for l in adapter.graph.layers}
    out = []
    for n in g.consumers:
        m = dense.get_submodule(n)
        idx = g.columns(n)  # input channels (conv) or features (linear) per group channel
        area = 1 if isinstance(m, nn.Linear) else m.kernel_size[0] * m.kernel_size[1]
        cols = (idx[:, :, None] * area + np.arange(area)).reshape(g.full, -1)
        block = np.unique(cols)
        w = m.weight.detach().double().reshape(m.weight.shape[0], -1)
        cov, mu = stats[n].cov(), stats[n].mean()
        b = torch.as_tensor(block)
        out.append(
            Consumer(
                n,
                w[:, b],
                cov[b][:, b],
                mu[b],
                block,
                np.searchsorted(block, cols),
                float(torch.trace(w @ cov @ w.T)),
                tuple(m.weight.shape),
                writes.get(n),
            )
        )
    return out


def _refit(c: Consumer, k: np.ndarray) -> torch.Tensor:
    """Least-squares weights over kept block positions ``k``: W_K + W_R C_RK C_KK^-1 (C_KK damped)."""
    r = np.setdiff1d(np.arange(len(c.block)), k)
    kt, rt = torch.as_tensor(k), torch.as_tensor(r)
    w = c.weight[:, kt]
    if len(r):
        ckk = c.cov[kt][:, kt]
        ckk = ckk + _DAMP * float(torch.diagonal(ckk).mean().clamp_min(1e-12)) * torch.eye(len(k), dtype=ckk.dtype)
        w = w + torch.linalg.solve(ckk, c.cov[kt][:, rt] @ c.weight[:, rt].T).T
    return w


def _refit_errors(cons: list[Consumer], order: np.ndarray, unit: Unit) -> np.ndarray:
    """True (undamped) output error of the refit at every allowed size; NaN elsewhere."""
    out = np.full(unit.full + 1, np.nan)
    for s in unit.sizes:
        keep = np.sort(order[unit.full - s :])
        err = 0.0
        for c in cons:
            k = np.sort(c.cols[keep].ravel())
            d = c.weight.clone()
            d[:, torch.as_tensor(k)] -= _refit(c, k)
            err += float(((d @ c.cov) * d).sum())
        out[s] = err
    return out


def _pair_matrix(c: Consumer) -> torch.Tensor:
    """(full, full): trace contributions of channel pairs to E||W_R x_R||^2 (centred)."""
    a = (c.weight.T @ c.weight) * c.cov
    flat = torch.as_tensor(c.cols.ravel())
    full, g = c.cols.shape
    return a[flat][:, flat].reshape(full, g, full, g).sum((1, 3))


def _curve(by_size: np.ndarray, energy: float) -> np.ndarray:
    """Errors indexed by kept size (NaN where not computed) -> normalised, non-increasing in size."""
    out = np.asarray(by_size, dtype=np.float64) / max(energy, 1e-30)
    ok = ~np.isnan(out)
    out[ok] = np.maximum.accumulate(np.clip(out[ok], 0.0, None)[::-1])[::-1]
    return out


def _plain_errors(cons: list[Consumer], order: np.ndarray) -> np.ndarray:
    """Removal error of the first k channels of ``order``, k = 0..full (no reconstruction)."""
    idx = torch.as_tensor(order)
    total = sum(_pair_matrix(c)[idx][:, idx].cumsum(0).cumsum(1).diagonal() for c in cons)
    return np.concatenate([[0.0], np.asarray(total)])


def _obs_order(cons: list[Consumer], full: int) -> np.ndarray:
    """Greedy OBS over all consumers at once, in rounds of ~1/32 of the group: the removal order.

    Errors come from the refit afterwards (:func:`_refit_errors`): the damped OBS score would charge
    even a dead channel ``damp * ||W_col||^2``.
    """
    ws, hinvs = [], []
    for c in cons:
        cov = c.cov
        lam = _DAMP * float(torch.diagonal(cov).mean().clamp_min(1e-12))
        hinvs.append(torch.linalg.inv(cov + lam * torch.eye(cov.shape[0], dtype=cov.dtype)))
        ws.append(c.weight.clone())
    alive = np.ones(full, dtype=bool)
    order: list[int] = []
    step = max(1, math.ceil(full / 32))
    while alive.sum() > 1:
        live = np.flatnonzero(alive)
        score = np.zeros(len(live))
        for c, w, h in zip(cons, ws, hinvs):
            cols = torch.as_tensor(c.cols[live])  # (k, g)
            blocks = h[cols[:, :, None], cols[:, None, :]]  # (k, g, g)
            wb = w[:, cols].permute(1, 0, 2)  # (k, out, g)
            sol = torch.linalg.solve(blocks, wb.transpose(1, 2))  # (k, g, out)
            score += (sol.transpose(1, 2) * wb).sum((1, 2)).numpy()
        take = live[np.argsort(score, kind="stable")[: min(step, len(live) - 1)]]
        for c, w, h in zip(cons, ws, hinvs):  # joint OBS update for the round's channels
            gcols = torch.as_tensor(c.cols[take].ravel())
            hgg, hg = h[gcols][:, gcols], h[gcols]  # (G, G), (G, width)
            w -= torch.linalg.solve(hgg, w[:, gcols].T).T @ hg
            h -= hg.T @ torch.linalg.solve(hgg, hg)
        order.extend(int(ch) for ch in take)  # cheaper first within the round
        alive[take] = False
    order.extend(int(i) for i in np.flatnonzero(alive))
    return np.asarray(order)


def _score(kind: str, adapter: CnnAdapter, g: ChannelGroup, cons: list[Consumer]) -> np.ndarray:
    """Importance per group channel (higher = keep) for the ranking proxies."""
    dense = adapter.dense()
    s = np.zeros(g.full)
    if kind == "flap":
        for c in cons:
            col = torch.diagonal(c.cov) * c.weight.square().sum(0)
            s += col[torch.as_tensor(c.cols)].sum(1).numpy()
        return s
    if kind == "bn_scale" and g.norms:
        for n in g.norms:
            gamma = dense.get_submodule(n).weight.detach().abs().double()
            s += gamma[torch.as_tensor(g.columns(n))].sum(1).numpy()
        return s
    for n in (*g.producers, *g.depthwise, *g.norms):  # magnitude (and bn_scale without BatchNorms)
        m = dense.get_submodule(n)
        rows = m.weight.detach().double().reshape(m.weight.shape[0], -1).square().sum(1)
        s += rows[torch.as_tensor(g.columns(n))].sum(1).numpy()
    for c in cons:
        s += c.weight.square().sum(0)[torch.as_tensor(c.cols)].sum(1).numpy()
    return s


class CnnState(ProxyState):
    """One fit, every candidate: nested kept sets per unit, cached reconstructions, BN recalibration."""

    def __init__(
        self,
        adapter: CnnAdapter,
        space: PruningSpace,
        *,
        name: str,
        orders: list[np.ndarray],
        errors: list[np.ndarray],
        consumers: list[list[Consumer]],
        calib: torch.Tensor,
        least_squares: bool,
        threads: int | None = None,
    ) -> None:
        super().__init__(adapter, space)
        self.cnn = adapter  # the same adapter, typed as the CNN family's (its channel graph)
        self.threads = threads
        self.name, self.orders, self.errors = name, orders, errors
        self.consumers, self.calib, self.least_squares = consumers, calib, least_squares
        self._levels: dict[tuple[int, int], dict[str, tuple[np.ndarray, torch.Tensor, torch.Tensor]]] = {}
        self._last: tuple[str, nn.Module, Plan, dict[str, torch.Tensor]] | None = None

    def unit_errors(self) -> list[np.ndarray]:
        return [e[list(u.sizes)].astype(np.float64) for e, u in zip(self.errors, self.space.units)]

    def kept(self, cand: Candidate) -> dict[str, tuple[int, ...]]:
        self.space.validate(cand)
        return {
            u.name: tuple(sorted(int(i) for i in o[u.full - s :]))
            for u, o, s in zip(self.space.units, self.orders, cand.sizes)
            if s < u.full
        }

    def _level(self, i: int, keep: tuple[int, ...]) -> dict[str, tuple[np.ndarray, torch.Tensor, torch.Tensor]]:
        """Consumer -> (removed full-input columns, weight over the block's kept columns, bias delta)."""
        key = (i, len(keep))
        if key not in self._levels:
            out = {}
            for c in self.consumers[i]:
                k = np.sort(c.cols[list(keep)].ravel())
                r = np.setdiff1d(np.arange(len(c.block)), k)
                kt = torch.as_tensor(k)
                w = _refit(c, k) if self.least_squares else c.weight[:, kt]
                # the mean of what changed goes into the bias; BN layers re-estimate it themselves
                delta = c.weight @ c.mean - w @ c.mean[kt]
                out[c.name] = (c.block[r], w, delta)
            self._levels[key] = out
        return self._levels[key]

    def _consumer_overrides(self, kept: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
        """Pruned-model tensors of every consumer whose input lost channels (several groups compose)."""
        dense, graph = self.cnn.dense(), self.cnn.graph
        acc: dict[str, tuple[torch.Tensor, np.ndarray, torch.Tensor]] = {}
        for i, u in enumerate(self.space.units):
            if u.name not in kept:
                continue
            for c in self.consumers[i]:
                if c.name not in acc:
                    m = dense.get_submodule(c.name)
                    acc[c.name] = (
                        m.weight.detach().double().reshape(m.weight.shape[0], -1).clone(),
                        np.ones(m.weight[0].numel(), dtype=bool),
                        torch.zeros(m.weight.shape[0], dtype=torch.float64),
                    )
                w_full, mask, bias = acc[c.name]
                removed, w, delta = self._level(i, kept[u.name])[c.name]
                kept_cols = np.setdiff1d(c.block, removed)
                w_full[:, torch.as_tensor(kept_cols)] = w
                mask[removed] = False
                bias += delta
        over: dict[str, torch.Tensor] = {}
        for name, (w_full, mask, bias) in acc.items():
            c = next(c for cs in self.consumers for c in cs if c.name == name)
            w = w_full[:, torch.as_tensor(np.flatnonzero(mask))]
            b = dense.get_submodule(name).bias
            b = None if b is None else b.detach().double() + bias
            if c.out_group in kept:  # the consumer's own output channels are pruned too
                rows = torch.as_tensor(np.sort(graph.group(c.out_group).columns(name)[list(kept[c.out_group])].ravel()))
                w, b = w[rows], (None if b is None else b[rows])
            over[name + ".weight"] = w.reshape(w.shape[0], -1, *c.shape[2:]).float()
            if b is not None:
                over[name + ".bias"] = b.float()
        return over

    def _build(self, cand: Candidate) -> tuple[nn.Module, Plan, dict[str, torch.Tensor]]:
        if self._last is not None and self._last[0] == cand.key():
            return self._last[1], self._last[2], self._last[3]
        kept = self.kept(cand)
        over = self._consumer_overrides(kept)
        plan = self.adapter.plan(kept, proxy=self.name, candidate=cand.key())
        with num_threads(self.threads):
            model = self.adapter.prune(self.adapter.dense(), plan, over)
            if kept:
                recalibrate_bn(model, self.calib)
            for n, buf in model.named_buffers():
                if n.endswith(("running_mean", "running_var")):
                    over[n] = buf.detach().clone()
        self._last = (cand.key(), model, plan, over)
        return model, plan, over

    def materialize(self, cand: Candidate) -> tuple[Plan, dict[str, torch.Tensor]]:
        _, plan, over = self._build(cand)
        return plan, dict(over)

    def build(self, cand: Candidate) -> nn.Module:
        import copy

        return copy.deepcopy(self._build(cand)[0])


def fit_cnn_proxy(
    kind: str,
    adapter: CnnAdapter,
    space: PruningSpace,
    calib: CalibData,
    *,
    batch: int = 16,
    threads: int | None = None,
    progress: bool = True,
    **_: Any,
) -> CnnState:
    """Fit proxy ``kind`` (magnitude | bn_scale | flap | obs) on ``calib.calib['input']``.

    ``threads`` pins torch's intra-op threads while fitting and building (None: leave torch's
    setting); on a shared machine 1 avoids OpenMP spin-waits that cost far more than they gain.
    """
    with num_threads(threads):
        return _fit(kind, adapter, space, calib, batch=batch, threads=threads)


def _fit(
    kind: str, adapter: CnnAdapter, space: PruningSpace, calib: CalibData, *, batch: int, threads: int | None
) -> CnnState:
    images = calib.calib["input"]
    groups = [adapter.graph.group(u.name) for u in space.units]
    names = sorted({c for g in groups for c in g.consumers})
    with torch.no_grad():
        stats = collect_input_stats(adapter.dense(), names, images, batch=batch)
    orders, errors, consumers = [], [], []
    for u, g in zip(space.units, groups):
        cons = _consumers(adapter, g, stats)
        energy = sum(c.energy for c in cons)
        if kind == "obs" and cons:
            order = _obs_order(cons, u.full)
            by_size = _refit_errors(cons, order, u)
        else:
            order = np.argsort(_score(kind, adapter, g, cons), kind="stable")
            by_size = (_plain_errors(cons, order) if cons else np.zeros(u.full + 1))[::-1]
        orders.append(order)
        errors.append(_curve(by_size, energy))
        consumers.append(cons)
    return CnnState(
        adapter,
        space,
        name=kind,
        orders=orders,
        errors=errors,
        consumers=consumers,
        calib=images,
        least_squares=kind == "obs",
        threads=threads,
    )


@register_proxy("magnitude", family="cnn")
def fit_magnitude(adapter: CnnAdapter, space: PruningSpace, calib: CalibData, **kw: Any) -> CnnState:
    """Group L2 norm of every coupled weight slice; plain removal."""
    return fit_cnn_proxy("magnitude", adapter, space, calib, **kw)


@register_proxy("bn_scale", family="cnn")
def fit_bn_scale(adapter: CnnAdapter, space: PruningSpace, calib: CalibData, **kw: Any) -> CnnState:
    """Sum of |gamma| of the group's BatchNorms (network slimming); plain removal."""
    return fit_cnn_proxy("bn_scale", adapter, space, calib, **kw)


@register_proxy("flap", family="cnn")
def fit_flap(adapter: CnnAdapter, space: PruningSpace, calib: CalibData, **kw: Any) -> CnnState:
    """Fluctuation of the consumers' inputs; the removed mean is compensated."""
    return fit_cnn_proxy("flap", adapter, space, calib, **kw)


@register_proxy("obs", family="cnn")
def fit_obs(adapter: CnnAdapter, space: PruningSpace, calib: CalibData, **kw: Any) -> CnnState:
    """Structured OBS order over the consumers' unfolded inputs, least-squares refit (default)."""
    return fit_cnn_proxy("obs", adapter, space, calib, **kw)
