"""Test-wide settings.

The test models are tiny (hidden size 32): with more than one intra-op thread each
small kernel pays thread start-up and, on a shared 2-core machine, oversubscription
(a fit measured 72 s with 2 threads next to another process, 0.45 s with one).
"""

import os

import torch

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Tiny models and the word-level tokenizer for tests are in tests/fixtures/models.py
# (``from tests.fixtures.models import tiny_llama_lora, tiny_tokenizer``).
