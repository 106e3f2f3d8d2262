"""Structured output: grammars (a JSON schema or a regex) that constrain what a request may generate.

spec.py (torch-free, what the HTTP workers validate with) names a grammar; the engine side compiles it for the
model's vocabulary (compiler.py), keeps one matcher per request (state.py) and fills token bitmasks while the forward
pass runs (masks.py); bitmask.py applies them to logits. docs/structured-output.md has the design and measurements.
"""
