"""Shared fixtures: the embedded SmolLM2 model (loaded once) and tiny random models per family.

Tiny models are built from configs in code (nothing is downloaded), seeded and eager, so the
capture and cache tests can compare against the model's own attention without a tokenizer: they
feed random token ids.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    Olmo2Config,
    Qwen2Config,
    Qwen3Config,
)
from transformers.models.gemma2 import Gemma2Config
from transformers.models.gemma3 import Gemma3TextConfig

from analysis.models.loading import load_model

# Under pytest-xdist (./run.sh test runs 2 workers) the cores are shared out between the workers, and
# the commands tests start in subprocesses inherit the same share, so no one oversubscribes the machine.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // _WORKERS))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

REPO = Path(__file__).resolve().parent.parent  # the repository root, whatever folder a test file sits in
VOCAB = 101
FAMILIES = ("llama", "qwen2", "mistral", "gpt2", "gpt_neox")
# Families whose attention normalises keys before RoPE (a ``k_norm`` module), each in its own layout:
# Qwen3 (B, T, H, D), Gemma 3 (B, H, T, D), OLMo 2 the whole projection (B, T, H*D). Gemma 3 also
# alternates sliding-window and full layers. Kept apart from FAMILIES (used by the cache tests).
KEY_NORM_FAMILIES = ("qwen3", "gemma3", "olmo2")
# Gemma 2: no key norm, but sliding-window layers and tanh soft-capped attention logits.
CAPTURE_FAMILIES = FAMILIES + KEY_NORM_FAMILIES + ("gemma2",)
SLIDING_WINDOW = 4  # the Gemma configs' window: shorter than the test sequences


def tiny_config(family: str):
    """A 4-layer config of ``family``; every rotary family has GQA except GPT-NeoX (no KV heads)."""

    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                  intermediate_size=128, max_position_embeddings=256)
    if family == "llama":
        return LlamaConfig(num_key_value_heads=2, **common)
    if family == "qwen2":
        return Qwen2Config(num_key_value_heads=2, **common)
    if family == "mistral":
        return MistralConfig(num_key_value_heads=2, sliding_window=None, **common)
    if family == "gpt2":
        return GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=4, n_head=4, n_positions=256,
                          bos_token_id=0, eos_token_id=0)
    if family == "gpt_neox":
        return GPTNeoXConfig(rotary_pct=0.25, **common)
    if family == "qwen3":
        return Qwen3Config(num_key_value_heads=2, head_dim=16, **common)
    if family == "olmo2":
        return Olmo2Config(num_key_value_heads=2, pad_token_id=0, eos_token_id=0, **common)
    if family == "gemma3":
        # head_dim 32 != hidden/heads and a query_pre_attn_scalar != head_dim, so neither can be assumed
        return Gemma3TextConfig(num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=20,
                                sliding_window=SLIDING_WINDOW, pad_token_id=0, eos_token_id=1, bos_token_id=2,
                                layer_types=["sliding_attention", "full_attention"] * 2, **common)
    if family == "gemma2":
        return Gemma2Config(num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=20, attn_logit_softcapping=0.05,
                            sliding_window=SLIDING_WINDOW, pad_token_id=0, eos_token_id=1, bos_token_id=2,
                            layer_types=["sliding_attention", "full_attention"] * 2, **common)
    raise ValueError(family)


def build_tiny(family: str, attn_implementation: str = "eager", seed: int = 0):

    torch.manual_seed(seed)
    config = tiny_config(family)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation,
                                             dtype=torch.float32)
    return model.eval()


def needs_setup(reason: str) -> None:
    """Skip locally when something the set-up provides is missing; under CI (which ran the set-up) fail."""
    if os.environ.get("CI"):
        pytest.fail(f"set-up should have provided this: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def tiny_model():
    """Factory: ``tiny_model(family, attn_implementation="eager")``, each built once per session."""
    built = {}

    def make(family: str, attn_implementation: str = "eager"):
        key = (family, attn_implementation)
        if key not in built:
            built[key] = build_tiny(family, attn_implementation)
        return built[key]

    return make


@pytest.fixture(scope="session")
def random_ids():
    """Factory: ``random_ids(batch, length, seed=0)`` -> (batch, length) int64 token ids."""
    def make(batch: int, length: int, seed: int = 0) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return torch.randint(0, VOCAB, (batch, length), generator=gen)

    return make


@pytest.fixture(scope="session")
def embedded():
    """The embedded SmolLM2-135M-Instruct (LoadedModel), on CPU in float32, eager attention."""

    return load_model(device="cpu")


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups (its hook has no order of its own)
def pytest_collection_modifyitems(config, items):
    """Under ``./run.sh test`` (two workers, ``--dist loadgroup``) a file's tests stay on one worker, so its
    module fixtures are built once, except tests marked ``spread`` (one figure each): any worker takes them."""
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            group = item.nodeid if item.get_closest_marker("spread") else item.module.__name__
            item.add_marker(pytest.mark.xdist_group(group))
