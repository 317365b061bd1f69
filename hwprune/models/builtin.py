"""Registers the built-in named models and families (imported lazily by the resolver)."""

from __future__ import annotations

from hwprune.models import register_family, register_model
from hwprune.models.bert import EncoderAdapter
from hwprune.models.encoder import EncoderConfig
from hwprune.surgery.encoder import skeleton
from hwprune.surgery.plan import Plan


@register_model("minilm")
def _minilm() -> EncoderAdapter:
    return EncoderAdapter.minilm()


@register_model("bert-base")
def _bert_base() -> EncoderAdapter:
    return EncoderAdapter.bert_base()


@register_family("encoder")
def _encoder_skeleton(plan: Plan) -> object:
    c = EncoderConfig.from_json(plan.arch)
    s = plan.sizes()
    heads = tuple(s.get(f"layer.{i}.heads", c.num_heads) for i in range(c.num_layers))
    ffn = tuple(s.get(f"layer.{i}.ffn", c.intermediate_size) for i in range(c.num_layers))
    return skeleton(c.with_sizes(heads, ffn))


# CNNs (torchvision models, package.module:factory) register themselves on import.
import hwprune.models.cnn  # noqa: E402,F401
