"""What a CUDA graph replays, run eagerly on the CPU (Triton's interpreter): a decode step written into the static
GraphBuffers overlay of a larger bucket (padding rows: length 0, slot -1), through forward_from_buffers, the function
each graph captures. Its logits equal the ordinary step's, with and without split keys, after a larger bucket left its
own layout in the buffers; the padding rows write nothing into the cache.
"""

from __future__ import annotations

import math

import pytest
import torch

from engine.cuda_graphs import forward_from_buffers
from engine.sampling_params import SamplingParams
from tests.support.oracle import Engines
from tests.support.tiny_models import random_prompt

pytest.importorskip("triton")

MODEL = "llama_gqa"


def test_a_decode_step_from_the_static_buffers_equals_the_eager_step(engines: Engines) -> None:
    llm = engines(MODEL, attention_backend="triton", block_size=16, max_num_seqs=8)
    engine, runner = llm.engine, llm.engine.runner
    for n in (5, 17, 40):
        engine.add_request(random_prompt(n, seed=700 + n), SamplingParams(max_new_tokens=4))
    engine.step()  # the prefills
    batch = engine.scheduler.schedule()
    try:
        step = runner.prepare(batch)
        assert step.is_decode_only and len(step.decode_tables) == 3
        eager = runner.run(step)  # writes the rows' K/V; writing them again below changes nothing
        layers = runner.model.attention_layers()
        caches = [c.clone() for layer in layers for c in (layer.k_cache, layer.v_cache)]
        buffers = runner.backend.graph_buffers(8, math.ceil(runner.max_model_len / runner.block_size))
        # bucket 8 first: bucket 4's overlay then reads over what the larger layout left in the same buffer
        for bucket, splits in ((8, 1), (4, 1), (4, 3), (8, 2)):
            runner.backend.fill_graph_buffers(buffers, step, bucket)
            with torch.inference_mode():
                logits = forward_from_buffers(runner, buffers, bucket, splits)[:3]
            torch.testing.assert_close(logits, eager, atol=1e-5, rtol=0)
            for before, after in zip(caches, [c for layer in layers for c in (layer.k_cache, layer.v_cache)]):
                # the rows' own slots get their K/V again (a padded batch rounds its matmuls a little differently
                # from layer 1 on); no other slot is touched: the padding rows wrote nothing
                flat_before, flat_after = before.flatten(0, 1), after.flatten(0, 1)
                torch.testing.assert_close(flat_after[step.slots], flat_before[step.slots], atol=1e-5, rtol=0)
                others = torch.ones(flat_before.shape[0], dtype=torch.bool)
                others[step.slots] = False
                assert torch.equal(flat_after[others], flat_before[others])
    finally:
        engine.scheduler.abandon(batch)
        for rid in list(engine._requests):
            engine.abort_request(rid)
