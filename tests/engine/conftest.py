"""Fixtures for the engine tests: tiny random checkpoints written with transformers, a trained tokenizer, the
transformers reference (`Oracle`) and cached engines, all from tests/support.

Everything is built offline under pytest's session tmp dir; weights come from a seeded torch RNG.
"""

from tests.support.fixtures import engines, oracle, single_torch_thread, tiny_models, tokenizer

__all__ = ["engines", "oracle", "single_torch_thread", "tiny_models", "tokenizer"]
