"""Inference engine: continuous batching over a paged KV cache, usable without the server.

from engine import LLM, SamplingParams
LLM().generate(["Hello"], SamplingParams(max_new_tokens=32))
"""

from engine.config import EngineConfig
from engine.llm import LLM
from engine.llm_engine import LLMEngine
from engine.outputs import RequestMetrics, RequestOutput
from engine.sampling_params import SamplingParams

__all__ = ["LLM", "EngineConfig", "LLMEngine", "RequestMetrics", "RequestOutput", "SamplingParams"]
