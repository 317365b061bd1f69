"""The ``cnn`` family: convolutional networks pruned by coupled channel groups (torch-pruning's graph).

Units: ``group.<n>`` channel groups (residual adds, depthwise convs and concatenations stay coupled; the
input and the classifier output stay whole). Named models: torchvision's ``resnet18``, ``resnet50``,
``mobilenet_v2``, ``vgg16_bn`` (random weights, nothing downloaded); any ``package.module:factory``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from hwprune.families import register_model, register_resolver
from hwprune.families.cnn import proxies  # noqa: F401  (registers the proxies)
from hwprune.families.cnn.adapter import NAMED_CNNS, CnnAdapter, import_factory

__all__ = ["CnnAdapter"]


def _named(name: str) -> Callable[[], CnnAdapter]:
    def make() -> CnnAdapter:
        return CnnAdapter(name)

    return make


for _n in NAMED_CNNS:
    register_model(_n)(_named(_n))


@register_resolver
def _resolve_factory(model: str) -> CnnAdapter | None:
    """``package.module:factory`` -> a CNN adapter (``--input-shape``/``--weights`` via ``configure``)."""
    if ":" not in model or Path(model).exists():
        return None
    import_factory(model)  # fail now, with one line, if it does not import
    return CnnAdapter(model)
