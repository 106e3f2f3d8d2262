"""Model building blocks written tensor-parallel-ready (vLLM's names), plus paged attention."""
