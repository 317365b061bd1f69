"""Accuracy proxies: the registry and the generic maths every family's proxies reuse.

- :mod:`._base`: ``CalibData``, ``ProxyState``, ``@register_proxy(name, family=...)``, ``fit_proxy``;
- :mod:`.obs`: structured OBS removal order and least-squares refit (ZipLM);
- :mod:`.flap`: fluctuation scores and bias compensation (FLAP);
- :mod:`.database`: nested removal orders and normalised, monotone error curves;
- :mod:`.stats`: running input statistics of linear projections; :mod:`.unfold`: of convolutions;
- :mod:`.calib`: the default text corpus and text files for text families.

The proxies themselves live with their family (``hwprune/families/<name>/``).
"""

from __future__ import annotations

from hwprune.proxies._base import CalibData, ProxyState, fit_proxy, get_proxy, proxy_names, register_proxy

__all__ = ["CalibData", "ProxyState", "fit_proxy", "get_proxy", "proxy_names", "register_proxy"]
