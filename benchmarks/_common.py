"""Shared set-up for the benchmark scripts: the sample model and timing helpers."""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def sample_session():
    from modeldoctor.model.sample import ensure_sample
    from modeldoctor.session import Session

    return Session.open(ensure_sample(lambda m: print(m, file=sys.stderr)))


@contextmanager
def timed(label: str, sink: dict | None = None):
    began = time.perf_counter()
    yield
    seconds = time.perf_counter() - began
    if sink is not None:
        sink[label] = seconds
    print(f"[{label}: {seconds:.1f} s]", file=sys.stderr)


def spearman(a, b) -> float:
    from modeldoctor.checkup.verdict import spearman as rank_correlation

    return rank_correlation(list(a), list(b))
