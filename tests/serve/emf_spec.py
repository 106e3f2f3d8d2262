"""The CloudWatch Embedded Metric Format specification as a test oracle, written from the spec's text
(docs.aws.amazon.com/AmazonCloudWatch/latest/monitoring/CloudWatch_Embedded_Metric_Format_Specification.html):
a JSON schema for the structure (checked with jsonschema) plus the rules a schema cannot say (target members).
"""

from __future__ import annotations

import json
import math
from typing import Any

import jsonschema

UNITS = (
    "Seconds Microseconds Milliseconds Bytes Kilobytes Megabytes Gigabytes Terabytes Bits Kilobits Megabits "
    "Gigabits Terabits Percent Count Bytes/Second Kilobytes/Second Megabytes/Second Gigabytes/Second "
    "Terabytes/Second Bits/Second Kilobits/Second Megabits/Second Gigabits/Second Terabits/Second Count/Second None"
).split()
_NAME = {"type": "string", "minLength": 1, "maxLength": 255}
SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["_aws"],
    "properties": {
        "_aws": {
            "type": "object",
            "required": ["Timestamp", "CloudWatchMetrics"],
            "properties": {
                "Timestamp": {"type": "integer", "minimum": 0},
                "CloudWatchMetrics": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["Namespace", "Dimensions", "Metrics"],
                        "properties": {
                            "Namespace": _NAME,
                            "Dimensions": {
                                "type": "array",
                                "minItems": 1,
                                "items": {"type": "array", "maxItems": 30, "items": _NAME},
                            },
                            "Metrics": {
                                "type": "array",
                                "maxItems": 100,
                                "items": {
                                    "type": "object",
                                    "required": ["Name"],
                                    "properties": {"Name": _NAME, "Unit": {"enum": UNITS}},
                                },
                            },
                        },
                    },
                },
            },
        }
    },
}


def validate_line(text: str) -> dict[str, Any]:
    """Parse one stdout line as an EMF document; raises (jsonschema.ValidationError or AssertionError) if invalid."""
    assert "\n" not in text.strip(), "an EMF document is one line"
    doc = json.loads(text)
    jsonschema.validate(doc, SCHEMA)
    for directive in doc["_aws"]["CloudWatchMetrics"]:
        for dimension_set in directive["Dimensions"]:
            for key in dimension_set:
                assert isinstance(doc.get(key), str), f"dimension {key!r} needs a string target member at the root"
        for metric in directive["Metrics"]:
            value = doc.get(metric["Name"])
            numbers = value if isinstance(value, list) else [value]
            assert len(numbers) <= 100, f"{metric['Name']}: more than 100 values"
            assert all(isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) for x in numbers), (
                f"metric {metric['Name']!r} needs a numeric target member (or array of numbers), got {value!r}"
            )
    return doc
