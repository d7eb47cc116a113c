"""Sampling of live traffic into a bounded, redacted store for the optimizer."""

from gateway.sampling.recorder import SAMPLE_HEADER, SampleRecorder
from gateway.sampling.redaction import Redactor
from gateway.sampling.store import (
    DiskSampleStore,
    Outcome,
    Sample,
    SampledChoice,
    SampleStore,
)

__all__ = [
    "SAMPLE_HEADER",
    "DiskSampleStore",
    "Outcome",
    "Redactor",
    "Sample",
    "SampleRecorder",
    "SampleStore",
    "SampledChoice",
]
