"""AWS event-stream binary framing (application/vnd.amazon.eventstream), encode side only: the frames
SageMaker's InvokeEndpointWithResponseStream sends, PayloadPart events and ModelStreamError exceptions.
Frame: total length, headers length, prelude CRC32, headers, payload, message CRC32 (all big-endian).
"""

from __future__ import annotations

import json
import struct
import zlib

_STRING = 7  # header value type: string (2-byte length prefix)


def _headers(headers: dict[str, str]) -> bytes:
    out = bytearray()
    for name, value in headers.items():
        raw_name, raw_value = name.encode(), value.encode()
        out += struct.pack(">B", len(raw_name)) + raw_name
        out += struct.pack(">BH", _STRING, len(raw_value)) + raw_value
    return bytes(out)


def encode_frame(headers: dict[str, str], payload: bytes) -> bytes:
    """One event-stream message with string headers."""
    raw_headers = _headers(headers)
    total = 12 + len(raw_headers) + len(payload) + 4
    prelude = struct.pack(">II", total, len(raw_headers))
    head = prelude + struct.pack(">I", zlib.crc32(prelude)) + raw_headers + payload
    return head + struct.pack(">I", zlib.crc32(head))


def payload_part(data: bytes) -> bytes:
    """A PayloadPart event: the frame payload is the raw bytes (PayloadPart.Bytes is the event payload)."""
    headers = {":event-type": "PayloadPart", ":content-type": "application/octet-stream", ":message-type": "event"}
    return encode_frame(headers, data)


def model_stream_error(message: str, error_code: str = "StreamBroken") -> bytes:
    """A ModelStreamError exception event; botocore raises it while the stream is iterated."""
    headers = {":exception-type": "ModelStreamError", ":content-type": "application/json", ":message-type": "exception"}
    return encode_frame(headers, json.dumps({"Message": message, "ErrorCode": error_code}).encode())


def internal_stream_failure(message: str) -> bytes:
    headers = {
        ":exception-type": "InternalStreamFailure", ":content-type": "application/json", ":message-type": "exception",
    }  # fmt: skip
    return encode_frame(headers, json.dumps({"Message": message}).encode())
