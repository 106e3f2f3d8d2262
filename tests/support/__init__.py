"""Helpers shared by the test directories: tiny tokenizer and checkpoints, the transformers oracle, the in-process
app, `serve` as a real subprocess, and SSE parsing. Test modules and conftests import from here, never from each
other's conftest.
"""
