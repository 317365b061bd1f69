"""``magnitude``: the baseline. Rank by weight norm, slice, compensate nothing.

Heads rank by ||W_o[:, head columns]||^2 and neurons by ||W_out[:, j]||^2 (``W_o``/``W_out`` the
output projections). The ranking uses no data; the error curves do: they are the true output error
of this plain removal under the calibration statistics, E||W_P x_P||^2 with the *uncentred* second
moment (nothing absorbs the mean of what is removed), so they compare with the other proxies' curves.
"""

from __future__ import annotations

import numpy as np
import torch

from hwprune.families._base import Family
from hwprune.families.encoder.collect import LayerStats
from hwprune.families.encoder.database import EncoderState, ensure_stats, sublayer
from hwprune.proxies._base import CalibData, register_proxy
from hwprune.proxies.database import Track, curve, prefix_errors
from hwprune.proxies.stats import num_threads
from hwprune.space import PruningSpace

__all__ = ["MagnitudeState", "fit_magnitude"]


class MagnitudeState(EncoderState):
    name = "magnitude"

    def _reconstruct(self, index: int, cols: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return None, None  # plain slicing: prune_encoder keeps the dense bias


@register_proxy("magnitude", family="encoder")
def fit_magnitude(
    adapter: Family,
    space: PruningSpace,
    calib: CalibData,
    *,
    stats: list[LayerStats] | None = None,
    batch: int = 16,
    threads: int | None = None,
    progress: bool = True,
) -> MagnitudeState:
    stats = ensure_stats(adapter, calib, stats, batch=batch, threads=threads, progress=progress)
    tracks = []
    with torch.inference_mode(), num_threads(1):  # mid-size float64 algebra: threads only add overhead
        for u in space.units:
            lin, st = sublayer(adapter, stats, u)
            w = lin.weight.detach().double()  # (out, full * granule)
            score = w.square().sum(0).reshape(u.full, u.granule).sum(1)
            order = np.argsort(score.numpy(), kind="stable")
            err = prefix_errors(w, st.second_moment(), order, u.granule)
            tracks.append(Track(u, order, curve(err, u, st.resid_energy)))
    return MagnitudeState(adapter, space, tracks, meta={"calib": calib.source})
