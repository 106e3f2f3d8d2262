"""GPUs per SageMaker instance type, for SM_NUM_GPUS when the caller gives no count. CPU families have none;
Inferentia/Trainium are refused (this container runs on CUDA or CPU); an unknown type needs an explicit count.
"""

from __future__ import annotations

import re

_SIZES_1_4_8 = {"xlarge": 1, "2xlarge": 1, "4xlarge": 1, "8xlarge": 1, "16xlarge": 1, "12xlarge": 4, "24xlarge": 4,
                "48xlarge": 8}  # fmt: skip
GPUS: dict[str, dict[str, int]] = {
    "g4dn": {"xlarge": 1, "2xlarge": 1, "4xlarge": 1, "8xlarge": 1, "16xlarge": 1, "12xlarge": 4, "metal": 8},
    "g5": _SIZES_1_4_8,
    "g6": _SIZES_1_4_8,
    "g6e": _SIZES_1_4_8,
    "p3": {"2xlarge": 1, "8xlarge": 4, "16xlarge": 8},
    "p3dn": {"24xlarge": 8},
    "p4d": {"24xlarge": 8},
    "p4de": {"24xlarge": 8},
    "p5": {"48xlarge": 8},
    "p5e": {"48xlarge": 8},
    "p5en": {"48xlarge": 8},
}
_CPU_FAMILY = re.compile(r"^(m|c|r|t)\d+[a-z]*$")  # ml.m5, ml.c7i, ml.r6id, ml.t3...
_NEURON_FAMILY = re.compile(r"^(inf|trn)\d+[a-z]*$")
_INSTANCE = re.compile(r"^ml\.([a-z0-9-]+)\.([a-z0-9]+)$")


class InstanceTypeError(ValueError):
    """An instance type this container cannot run on, or one whose GPU count is unknown."""


def gpu_count(instance_type: str) -> int | None:
    """GPUs of a SageMaker instance type: 0 for CPU instances, None when unknown (give the count explicitly)."""
    match = _INSTANCE.match(instance_type)
    if match is None:
        raise InstanceTypeError(f"instance_type must look like 'ml.g5.2xlarge', got {instance_type!r}")
    family, size = match.groups()
    if _NEURON_FAMILY.match(family):
        raise InstanceTypeError(f"{instance_type}: Inferentia/Trainium instances need a Neuron container, not this one")
    if _CPU_FAMILY.match(family):
        return 0
    return GPUS.get(family, {}).get(size)


def resolve_gpus(instance_type: str, num_gpus: int | None) -> int:
    """The GPU count to shard over: `num_gpus` when given (at most the instance's), else the instance's own."""
    known = gpu_count(instance_type)
    if num_gpus is None:
        if known is None:
            raise InstanceTypeError(f"the GPU count of {instance_type} is not known: pass num_gpus")
        return known
    if num_gpus < 0 or (known is not None and num_gpus > known):
        limit = f"between 0 and {known}" if known is not None else "non-negative"
        raise InstanceTypeError(f"num_gpus must be {limit} on {instance_type}, got {num_gpus}")
    return num_gpus
