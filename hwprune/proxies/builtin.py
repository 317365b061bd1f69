"""Imports the built-in proxies so their ``@register_proxy`` decorators run (loaded lazily by the registry)."""

from __future__ import annotations

from hwprune.proxies import flap, magnitude, obs  # noqa: F401

DEFAULT_PROXY = "obs"

# CNN proxies (magnitude, bn_scale, flap, obs for family "cnn") register on import.
from hwprune.proxies import cnn  # noqa: E402,F401
