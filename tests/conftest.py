import os

# Tests never reach the Hugging Face hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402

from rlhf_core.clinical.cases import Case  # noqa: E402

# The tiny random models the tests train need far larger steps than a real model
# to move measurably: the suite widens those ranges the way an administrator would
# (bounds.BOUNDS_ENV). tests/training/test_bounds.py checks the product's own ranges.
TEST_BOUNDS = '{"lr": [1e-12, 0.1], "clip_eps_high": [0.01, 1000], "max_kl": [1e-9, 1e9]}'


@pytest.fixture(autouse=True)
def _wide_bounds_for_tiny_models(monkeypatch):
    monkeypatch.setenv("RLHF_BOUNDS", TEST_BOUNDS)


@pytest.fixture
def case():
    return Case(
        id="t-appendicitis",
        question="A 22-year-old man has right lower quadrant pain, fever and rebound tenderness. What is the most likely diagnosis?",
        answer="acute appendicitis",
        aliases=["appendicitis"],
        distractors=["mesenteric adenitis"],
    )


@pytest.fixture
def tiny_lm():
    from rlhf_core.model.models import load_model

    return load_model("tiny-random", device="cpu")


@pytest.fixture
def tiny_lora_lm():
    from rlhf_core.model.models import load_model

    return load_model("tiny-random", device="cpu", lora=True)


@pytest.fixture
def tiny_engine():
    from rlhf_core.engine import Engine

    return Engine("tiny-random", device="cpu")


@pytest.fixture
def tiny_lora_engine():
    from rlhf_core.engine import Engine

    return Engine("tiny-random", lora=True, device="cpu")
