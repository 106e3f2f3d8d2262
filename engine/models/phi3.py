"""Phi-3 / Phi-3.5: the Llama decoder with checkpoints that fuse q/k/v (qkv_proj) and gate/up (gate_up_proj) into
one tensor each (loaded split by the packed layers), `longrope` scaling (short factors within the original context,
long ones beyond), partial rotary where configured, and a sliding window on every layer when set."""

from __future__ import annotations

from engine.models.llama import LlamaForCausalLM


class Phi3ForCausalLM(LlamaForCausalLM):
    decoder_stack = False
