"""Encoder ``obs`` (default proxy): structured OBS per output projection with least-squares
reconstruction; the maths is :mod:`hwprune.proxies.obs`."""

from __future__ import annotations

import numpy as np
import torch

from hwprune.families._base import Family
from hwprune.families.encoder.collect import LayerStats
from hwprune.families.encoder.database import EncoderState, ensure_stats, sublayer
from hwprune.proxies._base import CalibData, register_proxy
from hwprune.proxies.database import Track, curve
from hwprune.proxies.obs import damped, ls_weights, obs_order
from hwprune.proxies.stats import num_threads, progress_bar
from hwprune.space import PruningSpace

__all__ = ["ObsState", "fit_obs"]


class ObsState(EncoderState):
    name = "obs"

    def __init__(self, *args: object, params: list[tuple[torch.Tensor, ...] | None], **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]  # forwards EncoderState.__init__ unchanged
        self._params = params  # per unit: (W, b, mean, damped covariance) float64

    def _reconstruct(self, index: int, cols: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        w, b, mu, hd = self._params[index]  # type: ignore[misc]  # None only for units kept whole, never rebuilt
        if len(cols) == 0:
            return None, b + w @ mu
        with num_threads(1):  # one mid-size Cholesky: threads cost more than they bring (see fit_obs)
            new = ls_weights(w, hd, cols)
        return new, b + w @ mu - new @ mu[cols]


@register_proxy("obs", family="encoder")
def fit_obs(
    adapter: Family,
    space: PruningSpace,
    calib: CalibData,
    *,
    stats: list[LayerStats] | None = None,
    damp: float = 0.01,
    block: float = 0.02,
    batch: int = 16,
    threads: int | None = None,
    progress: bool = True,
) -> ObsState:
    stats = ensure_stats(adapter, calib, stats, batch=batch, threads=threads, progress=progress)
    tracks: list[Track] = []
    params: list[tuple[torch.Tensor, ...] | None] = []
    # one thread: the many small LAPACK/BLAS-2 calls of the greedy loop run 5-20x slower with MKL's
    # threads (and far worse when other processes share the cores)
    with torch.inference_mode(), num_threads(1), progress_bar(progress) as bar:
        task = bar.add_task("OBS database", total=len(space.units))
        for u in space.units:
            bar.update(task, description=f"OBS {u.name}")
            lin, st = sublayer(adapter, stats, u)
            w, b = lin.weight.detach().double(), lin.bias.detach().double()
            hd = damped(st.cov(), damp)
            if len(u.sizes) == 1:  # kept whole: nothing to fit
                order, err = np.arange(u.full), np.zeros(1)
            else:
                eye = torch.eye(hd.shape[0], dtype=hd.dtype)
                hinv = torch.cholesky_solve(eye, torch.linalg.cholesky(hd))  # cholesky_inverse is slow in MKL
                order, steps = obs_order(w, hinv, granule=u.granule, stop=u.sizes[0], block=block)
                err = np.concatenate([[0.0], np.cumsum(steps)])
            tracks.append(Track(u, order, curve(err, u, st.resid_energy)))
            params.append((w, b, st.mean.clone(), hd))
            bar.advance(task)
    return ObsState(adapter, space, tracks, params=params, meta={"calib": calib.source, "damp": damp, "block": block})
