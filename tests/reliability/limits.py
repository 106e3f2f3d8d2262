"""The limits of the reliability suite's shared `serve` (small, so that a few requests exhaust the KV cache and the
admission limit), read by the conftest that starts it and by the tests that push against them.
"""

PAYLOAD_LIMIT = 64 * 1024
MAX_CONCURRENT = 6
KV_TOKENS = 1024  # 32 CPU blocks of 32 tokens: six 400-token streams cannot all fit
SHARED = dict(
    MAX_TOTAL_TOKENS="512",
    MAX_BATCH_TOTAL_TOKENS=str(KV_TOKENS),
    MAX_CONCURRENT_REQUESTS=str(MAX_CONCURRENT),
    PAYLOAD_LIMIT=str(PAYLOAD_LIMIT),
    SERVE_WORKERS="2",
    SERVE_THREADS="8",  # fewer threads than the overload tests' connections: health checks must not queue
)
