"""Accuracy proxies (per-unit error curves + reconstructed weights) and end-to-end scoring."""

from __future__ import annotations

from hwprune.proxies._base import CalibData, ProxyState, fit_proxy, get_proxy, proxy_names, register_proxy

__all__ = ["CalibData", "ProxyState", "fit_proxy", "get_proxy", "proxy_names", "register_proxy", "load_calib",
           "EndToEndScorer"]


def __getattr__(name: str) -> object:  # lazy: calibration pulls in tokenizers, scoring pulls in the model
    if name == "load_calib":
        from hwprune.proxies.calib import load_calib

        return load_calib
    if name == "EndToEndScorer":
        from hwprune.proxies.e2e import EndToEndScorer

        return EndToEndScorer
    raise AttributeError(name)
