"""Encoder ``flap``: FLAP's fluctuation metric plus bias compensation (An et al., AAAI 2024).

The fluctuation of input channel j of an output projection is Var(x_j) * ||W[:, j]||^2: a channel
that barely varies can be replaced by its mean, which the bias absorbs (b += W[:, P] mean(x_P)).
Heads sum the score over their columns. FLAP standardises scores per layer so one global threshold
can compare layers; here the error curves already compare (they are the true output error after
compensation, E||W_P (x_P - mean)||^2 normalised), so the standardised scores are kept in
``FlapState.scores`` for inspection and the ranking inside a unit is the raw score's (the same order).
"""

from __future__ import annotations

import numpy as np
import torch

from hwprune.families._base import Family
from hwprune.families.encoder.collect import LayerStats
from hwprune.families.encoder.database import EncoderState, ensure_stats, sublayer
from hwprune.proxies._base import CalibData, register_proxy
from hwprune.proxies.database import Track, curve, prefix_errors
from hwprune.proxies.flap import compensated_bias, fluctuation
from hwprune.proxies.stats import num_threads
from hwprune.space import PruningSpace

__all__ = ["FlapState", "fit_flap"]


class FlapState(EncoderState):
    name = "flap"

    def __init__(
        self,
        *args: object,
        params: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
        scores: dict[str, np.ndarray],
        **kw: object,
    ) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]  # forwards EncoderState.__init__ unchanged
        self._params, self.scores = params, scores  # per unit: (W, b, mean) float64

    def _reconstruct(self, index: int, cols: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        w, b, mu = self._params[index]
        return None, compensated_bias(w, b, mu, cols)


@register_proxy("flap", family="encoder")
def fit_flap(
    adapter: Family,
    space: PruningSpace,
    calib: CalibData,
    *,
    stats: list[LayerStats] | None = None,
    batch: int = 16,
    threads: int | None = None,
    progress: bool = True,
) -> FlapState:
    stats = ensure_stats(adapter, calib, stats, batch=batch, threads=threads, progress=progress)
    tracks, params, scores = [], [], {}
    with torch.inference_mode(), num_threads(1):  # mid-size float64 algebra: threads only add overhead
        for u in space.units:
            lin, st = sublayer(adapter, stats, u)
            w, b = lin.weight.detach().double(), lin.bias.detach().double()
            score = fluctuation(w, st.var, u.granule).numpy()
            scores[u.name] = (score - score.mean()) / max(float(score.std()), 1e-30)
            order = np.argsort(score, kind="stable")
            err = prefix_errors(w, st.cov(), order, u.granule)
            tracks.append(Track(u, order, curve(err, u, st.resid_energy)))
            params.append((w, b, st.mean.clone()))
    return FlapState(adapter, space, tracks, params=params, scores=scores, meta={"calib": calib.source})
