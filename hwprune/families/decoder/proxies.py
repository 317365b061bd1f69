"""Decoder accuracy proxies: ``magnitude``, ``wanda_sp``, ``flap`` and ``obs`` (the default).

Every proxy ranks the elements of each unit (KV groups of ``layer.{i}.attn``: ``granule = group_size *
head_dim`` columns of ``o_proj``; neurons of ``layer.{i}.ffn``: one column of ``down_proj``) and
reports, per kept size, the mean squared change of the sublayer's output per calibration token
divided by the residual energy entering the sublayer (see :mod:`.database`): comparable across
units and proxies, 0 at full size, non-increasing in size, so the DP can add them.

Which second moment measures an error depends on what absorbs the mean of the removed inputs. A
LLaMA / Mistral / Qwen2 output projection has no bias, so nothing does: errors use the *uncentred*
``E[x x^T]``. Where the projection has a bias (GPT-2's ``o_proj_bias`` / ``mlp_bias``), ``flap`` and
``obs`` fold the removed inputs' mean into it and their errors use the covariance.

- ``magnitude``: rank by ``||W[:, e]||^2``; no data for the ranking, plain removal.
- ``wanda_sp``: structured Wanda, ``sum_{j in e} sum_i |W_ij| * ||x_j||``; plain removal.
- ``flap``: FLAP's fluctuation ``Var(x_j) * ||W[:, j]||^2``; bias compensation where there is a bias.
- ``obs``: structured OBS order and least-squares refit of the kept columns.
- ``bi`` / ``angular`` (depth): a sublayer's removal priced by ShortGPT's Block Influence ``1 - cos``
  or by the angular distance ``arccos(cos) / pi`` between the streams entering and leaving it; sizes
  between 0 and full cost as much as removal, so the search removes sublayers and blocks.

All fits take ``(adapter, space, calib, *, stats=None, batch=8, threads=None, progress=True)`` plus
their own options; ``stats`` (from :func:`.collect.collect_stats`) lets one pass serve several proxies.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch

from hwprune._mem import release
from hwprune.errors import HwpruneError
from hwprune.families._base import Family
from hwprune.proxies._base import CalibData, register_proxy
from hwprune.proxies.database import Track, curve, prefix_errors
from hwprune.proxies.flap import compensated_bias, fluctuation
from hwprune.proxies.obs import damped, inverse_spd_, ls_weights_blocks, obs_order
from hwprune.proxies.stats import SublayerStats, num_threads, progress_bar
from hwprune.space import PruningSpace

from .collect import LayerStats
from .database import DecoderState, ensure_stats, sublayer

__all__ = [
    "MagnitudeState",
    "WandaState",
    "FlapState",
    "ObsState",
    "fit_magnitude",
    "fit_wanda_sp",
    "fit_flap",
    "fit_obs",
    "DepthState",
    "BlockInfluenceState",
    "AngularState",
    "fit_block_influence",
    "fit_angular",
]


def _weight(lin: torch.nn.Linear, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W (out, in) in ``dtype``, b (out,) float64 or None): fresh copies, the caller's to keep or overwrite."""
    b = lin.bias.detach().double() if lin.bias is not None else None
    return lin.weight.detach().to(dtype, copy=True), b


# States keep the dense model's own float32 weight tensors (no copies: a float64 copy of every
# projection would double llama-3.2-1b's footprint) and convert per use.
Params = tuple[torch.Tensor, torch.Tensor | None, SublayerStats]  # (dense W (out, in), dense b or None, stats)


def _params(lin: torch.nn.Linear, st: SublayerStats) -> Params:
    return lin.weight.detach(), (lin.bias.detach() if lin.bias is not None else None), st


class _PlainState(DecoderState):
    """Plain removal: slice the dense projection, keep its bias (and leave it as ``out_bias`` at size 0)."""

    def _reconstruct(self, index: int, cols: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return None, None


ScoreFn = Callable[[torch.Tensor, SublayerStats, int], torch.Tensor]


def _plain_tracks(score_fn: ScoreFn, adapter: Family, space: PruningSpace, stats: list[LayerStats]) -> list[Track]:
    """Order each unit by ``score_fn(W, stats, granule)`` (ascending, (full,)) and price plain removal."""
    tracks = []
    with torch.inference_mode(), num_threads(1):  # mid-size float64 algebra: threads only add overhead
        for u in space.units:
            lin, st = sublayer(adapter, stats, u)
            w, _ = _weight(lin, st.dtype)
            order = np.argsort(score_fn(w, st, u.granule).numpy(), kind="stable")
            err = prefix_errors(w, st.second_moment(), order, u.granule)
            del w
            tracks.append(Track(u, order, curve(err, u, st.resid_energy)))
    return tracks


# ---- magnitude ------------------------------------------------------------------------------------


class MagnitudeState(_PlainState):
    name = "magnitude"


def _magnitude_score(w: torch.Tensor, _st: SublayerStats, granule: int) -> torch.Tensor:
    return w.square().sum(0).reshape(-1, granule).sum(1)


@register_proxy("magnitude", family="decoder")
def fit_magnitude(
    adapter: Family,
    space: PruningSpace,
    calib: CalibData,
    *,
    stats: list[LayerStats] | None = None,
    batch: int = 8,
    threads: int | None = None,
    progress: bool = True,
) -> MagnitudeState:
    """Rank by the squared norm of each element's columns; the error curves use the calibration data."""
    stats = ensure_stats(adapter, calib, stats, batch=batch, threads=threads, progress=progress)
    return MagnitudeState(
        adapter, space, _plain_tracks(_magnitude_score, adapter, space, stats), meta={"calib": calib.source}
    )


# ---- wanda_sp -------------------------------------------------------------------------------------


class WandaState(_PlainState):
    name = "wanda_sp"


def _wanda_score(w: torch.Tensor, st: SublayerStats, granule: int) -> torch.Tensor:
    norms = st.sumsq.sqrt()  # ||x_j|| over the calibration tokens
    return (w.abs().sum(0) * norms).reshape(-1, granule).sum(1)


@register_proxy("wanda_sp", family="decoder")
def fit_wanda_sp(
    adapter: Family,
    space: PruningSpace,
    calib: CalibData,
    *,
    stats: list[LayerStats] | None = None,
    batch: int = 8,
    threads: int | None = None,
    progress: bool = True,
) -> WandaState:
    """Structured Wanda (Wanda-sp): sum of ``|W_ij| * ||x_j||`` over an element's weights; plain removal."""
    stats = ensure_stats(adapter, calib, stats, batch=batch, threads=threads, progress=progress)
    return WandaState(adapter, space, _plain_tracks(_wanda_score, adapter, space, stats), meta={"calib": calib.source})


# ---- flap -----------------------------------------------------------------------------------------


class FlapState(DecoderState):
    """FLAP: fluctuation ranking; the removed inputs' mean goes into the bias where the projection has one.

    LLaMA-style projections have no bias, so there FLAP is the fluctuation ranking with plain removal
    (the pruned model has no parameter to hold the compensation) and its curves use ``E[x x^T]``.
    ``scores`` holds FLAP's per-unit standardised scores for inspection; the ranking inside a unit is
    the raw score's (the same order).
    """

    name = "flap"

    def __init__(
        self,
        *args: object,
        params: list[Params],
        scores: dict[str, np.ndarray],
        **kw: object,
    ) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]  # forwards DecoderState.__init__ unchanged
        self._params, self.scores = params, scores

    def _reconstruct(self, index: int, cols: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        w, b, st = self._params[index]
        if b is None:
            return None, None
        return None, compensated_bias(w.double(), b.double(), st.mean, cols)


@register_proxy("flap", family="decoder")
def fit_flap(
    adapter: Family,
    space: PruningSpace,
    calib: CalibData,
    *,
    stats: list[LayerStats] | None = None,
    batch: int = 8,
    threads: int | None = None,
    progress: bool = True,
) -> FlapState:
    """FLAP (An et al., AAAI 2024) per unit; bias compensation only where the projection has a bias."""
    stats = ensure_stats(adapter, calib, stats, batch=batch, threads=threads, progress=progress)
    tracks, params, scores = [], [], {}
    compensated: list[str] = []
    with torch.inference_mode(), num_threads(1):
        for u in space.units:
            lin, st = sublayer(adapter, stats, u)
            w, b = _weight(lin, st.dtype)
            score = fluctuation(w, st.var.to(w.dtype), u.granule).numpy()
            scores[u.name] = (score - score.mean()) / max(float(score.std()), 1e-30)
            order = np.argsort(score, kind="stable")
            moment = st.cov() if b is not None else st.second_moment()
            err = prefix_errors(w, moment, order, u.granule)
            tracks.append(Track(u, order, curve(err, u, st.resid_energy)))
            params.append(_params(lin, st))
            if b is not None:
                compensated.append(u.name)
    meta = {"calib": calib.source, "bias_compensated": compensated}
    return FlapState(adapter, space, tracks, params=params, scores=scores, meta=meta)


# ---- obs ------------------------------------------------------------------------------------------


class ObsState(DecoderState):
    """Structured OBS; a level is the least-squares refit ``W Hd[:, K] Hd[K, K]^-1`` of the kept columns.

    ``Hd`` is the damped Hessian: the covariance (plus the bias update ``b + W mu - W' mu_K``) where the
    projection has a bias, else the uncentred second moment ``E[x x^T]`` (no bias absorbs the mean).
    It is rebuilt from the statistics on demand rather than stored per unit (O(width^2) each).
    """

    name = "obs"

    def __init__(
        self,
        *args: object,
        params: list[Params],
        damp: float,
        **kw: object,
    ) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]  # forwards DecoderState.__init__ unchanged
        self._params, self.damp = params, damp  # per unit: (W, b or None, input statistics)

    def _hessian_blocks(self, index: int, cols: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
        """Rows ``cols`` of unit ``index``'s damped Hessian (class docstring), a few at a time; spilled
        statistics never become a whole width^2 matrix here (an 8192-wide FFN: 161 MB of kept rows, not
        268 MB whole)."""
        _, b, st = self._params[index]
        return st.hessian_blocks(cols, centered=b is not None, damp=self.damp)

    def _reconstruct(self, index: int, cols: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        w32, b32, st = self._params[index]
        w, b, mu = w32.to(st.dtype), (b32.double() if b32 is not None else None), st.mean
        if len(cols) == 0:
            return None, (b + w.double() @ mu) if b is not None else None
        with num_threads(1):  # one mid-size Cholesky: threads cost more than they bring
            new = ls_weights_blocks(w, self._hessian_blocks(index, cols), cols)
        if b is None:
            return new, None
        return new, b + w.double() @ mu - new.double() @ mu[cols]


@register_proxy("obs", family="decoder")
def fit_obs(
    adapter: Family,
    space: PruningSpace,
    calib: CalibData,
    *,
    stats: list[LayerStats] | None = None,
    damp: float = 0.01,
    block: float = 0.02,
    batch: int = 8,
    threads: int | None = None,
    progress: bool = True,
) -> ObsState:
    """Structured OBS (ZipLM-style) per unit: ``damp`` of the Hessian, ``block`` fraction of neurons per round."""
    stats = ensure_stats(adapter, calib, stats, batch=batch, threads=threads, progress=progress)
    tracks: list[Track] = []
    params: list[Params] = []
    state_meta = {"calib": calib.source, "damp": damp, "block": block}
    # one thread: the many small LAPACK/BLAS-2 calls of the greedy loop run much slower with threads
    with torch.inference_mode(), num_threads(1), progress_bar(progress) as bar:
        task = bar.add_task("OBS database", total=len(space.units))
        for u in space.units:
            bar.update(task, description=f"OBS {u.name}")
            lin, st = sublayer(adapter, stats, u)
            params.append(_params(lin, st))
            if len(u.sizes) == 1:  # kept whole: nothing to fit
                order, err = np.arange(u.full), np.zeros(1)
            else:
                w, b = _weight(lin, st.dtype)
                hd = damped(st.cov() if b is not None else st.second_moment(), damp, inplace=True)
                if st.dtype == torch.float64:  # cholesky_inverse is slow in MKL; solve against I instead
                    chol = torch.linalg.cholesky(hd)
                    del hd
                    hinv = torch.cholesky_solve(torch.eye(chol.shape[0], dtype=chol.dtype), chol)
                    del chol
                else:  # very wide (float32): the inverse in the Hessian's own buffer (one width^2, not three)
                    hinv = inverse_spd_(hd)
                    del hd
                order, steps = obs_order(w, hinv, granule=u.granule, stop=u.sizes[0], block=block, overwrite=True)
                del w, hinv
                err = np.concatenate([[0.0], np.cumsum(steps)])
            tracks.append(Track(u, order, curve(err, u, st.resid_energy)))
            release()  # the unit's Hessian inverse and weights: back to the OS
            bar.advance(task)
    return ObsState(adapter, space, tracks, params=params, damp=damp, meta=state_meta)


# ---- depth: Block Influence and angular distance -----------------------------------------------------


class DepthState(_PlainState):
    """A depth proxy prices a sublayer kept (0) or removed (its score), nothing in between.

    Every size below full costs the removal score, so the DP spends its budget on removing whole
    sublayers and blocks (narrowing one costs as much and saves less). Should a candidate still keep
    a unit at an intermediate size, its elements go by weight magnitude, plain removal.
    ``depth`` holds the per-layer scores for inspection: ``attn``, ``ffn`` and ``block`` (the whole
    block's, ShortGPT's figure).
    """

    def __init__(self, *args: object, depth: dict[str, np.ndarray], **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]  # forwards DecoderState.__init__ unchanged
        self.depth = depth

    def removal_order(self) -> list[int]:
        """Blocks least important first by their own score (ShortGPT's order for ``bi``)."""
        return [int(i) for i in np.argsort(self.depth["block"], kind="stable")]


class BlockInfluenceState(DepthState):
    name = "bi"


class AngularState(DepthState):
    """Angular distance ``arccos(cos) / pi`` per sublayer, and Gromov et al.'s rule for runs of blocks.

    ``runs[n - 1, l]``: mean over calibration sequences of the angular distance between the stream
    entering block ``l`` and leaving block ``l + n - 1`` at the sequence's last real token (NaN where
    the run passes the last block). :meth:`best_run` picks the run to remove for ``n`` blocks.
    """

    name = "angular"

    def __init__(self, *args: object, runs: np.ndarray, depth: dict[str, np.ndarray], **kw: object) -> None:
        super().__init__(*args, depth=depth, **kw)
        self.runs = runs

    def best_run(self, n: int) -> tuple[int, float]:
        """(first block, distance) of the ``n`` consecutive blocks whose removal changes the stream least."""
        if not 1 <= n <= self.runs.shape[0]:
            raise HwpruneError(f"a run of {n} blocks: choose 1 to {self.runs.shape[0]}")
        row = self.runs[n - 1]
        start = int(np.nanargmin(row))
        return start, float(row[start])


def _angle(cos: float | np.ndarray | torch.Tensor) -> np.ndarray:
    return np.arccos(np.clip(np.asarray(cos, dtype=np.float64), -1.0, 1.0)) / np.pi


def _depth_tracks(
    adapter: Family, space: PruningSpace, stats: list[LayerStats], score: dict[str, np.ndarray]
) -> list[Track]:
    tracks = []
    with torch.inference_mode():
        for u in space.units:
            lin, st = sublayer(adapter, stats, u)
            magnitude = _magnitude_score(lin.weight.detach().double(), st, u.granule)
            order = np.argsort(magnitude.numpy(), kind="stable")
            err = np.full(u.full + 1, float(max(score[u.kind][u.layer], 0.0)))
            err[u.full] = 0.0
            tracks.append(Track(u, order, err))
    return tracks


@register_proxy("bi", family="decoder")
def fit_block_influence(
    adapter: Family,
    space: PruningSpace,
    calib: CalibData,
    *,
    stats: list[LayerStats] | None = None,
    batch: int = 8,
    threads: int | None = None,
    progress: bool = True,
) -> BlockInfluenceState:
    """ShortGPT's Block Influence, ``1 - mean cos(h_in, h_out)`` over calibration tokens, per sublayer.

    A whole block's removal is priced as its two sublayers' sum; ``depth["block"]`` keeps the block's own.
    """
    stats = ensure_stats(adapter, calib, stats, batch=batch, threads=threads, progress=progress)
    depth = {
        "attn": np.array([1.0 - s.cos_attn for s in stats]),
        "ffn": np.array([1.0 - s.cos_ffn for s in stats]),
        "block": np.array([1.0 - s.cos_block for s in stats]),
    }
    tracks = _depth_tracks(adapter, space, stats, depth)
    return BlockInfluenceState(adapter, space, tracks, depth=depth, meta={"calib": calib.source})


@register_proxy("angular", family="decoder")
def fit_angular(
    adapter: Family,
    space: PruningSpace,
    calib: CalibData,
    *,
    stats: list[LayerStats] | None = None,
    batch: int = 8,
    threads: int | None = None,
    progress: bool = True,
) -> AngularState:
    """Angular distance (Gromov et al., 2024): ``arccos(cos) / pi`` between a sublayer's input and output
    streams per unit; whole runs of blocks from the last-token streams (:meth:`AngularState.best_run`)."""
    stats = ensure_stats(adapter, calib, stats, batch=batch, threads=threads, progress=progress)
    layers = len(stats)
    runs = np.full((layers, layers), np.nan)
    for first in range(layers):
        a = stats[first].last_in.double()
        for n in range(1, layers - first + 1):
            b = stats[first + n - 1].last_out.double()
            cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-30)
            runs[n - 1, first] = float(_angle(cos.numpy()).mean())
    depth = {
        "attn": _angle(np.array([s.cos_attn for s in stats])),
        "ffn": _angle(np.array([s.cos_ffn for s in stats])),
        "block": runs[0].copy(),
    }
    tracks = _depth_tracks(adapter, space, stats, depth)
    return AngularState(adapter, space, tracks, depth=depth, runs=runs, meta={"calib": calib.source})
