from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.manual_seed(0)


@pytest.fixture(scope="session")
def minilm():
    from hwprune.families import resolve_model

    return resolve_model("minilm")


@pytest.fixture()
def tiny():
    from hwprune.families.encoder.adapter import EncoderAdapter

    return EncoderAdapter.tiny(layers=2, heads=4, head_dim=8, ffn=32)
