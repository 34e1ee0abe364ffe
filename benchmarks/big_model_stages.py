"""Where the memory of a checkup of the 1.1 B model goes: peak resident memory per stage.

The same checkup as big_model.py (two-stage linear scope, int4-g32-asym, 1024 tokens) on the
random Llama it builds, with the peak-memory counter reset at every stage (reference, estimate,
each exact probe up to the fifth, the knowledge stage), so each line is that stage's own peak.
Run big_model.py first (it builds the model). Usage: python benchmarks/big_model_stages.py [--tokens 1024]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
from big_model import model_folder, peak_rss_bytes  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=1024)
    args = parser.parse_args()

    from modeldoctor.checkup.plan import CheckupPlan
    from modeldoctor.checkup.run import run_checkup
    from modeldoctor.data import DataSpec
    from modeldoctor.events import Finished, ProbeResult, Stage
    from modeldoctor.session import Session

    session = Session.open(model_folder())
    fp32 = session.summary.parameters * 4
    began = time.perf_counter()

    def mark(label: str) -> None:
        peak = peak_rss_bytes()
        print(f"{time.perf_counter() - began:6.0f} s  {label:<58} peak {peak / 2**30:5.2f} GiB = "
              f"{peak / fp32:.2f}x fp32", flush=True)
        Path("/proc/self/clear_refs").write_text("5")

    mark("loaded")
    data = session.data(DataSpec(tokens=args.tokens, seq_len=256))
    mark("data")
    stage, exact = "start", 0
    for event in run_checkup(session, CheckupPlan(modifications=["int4-g32-asym"], scope="linears"), data):
        if isinstance(event, Stage):
            mark(f"{stage}")
            stage = event.name
        elif isinstance(event, ProbeResult) and not event.record.estimated and stage != "knowledge":
            exact += 1  # stage 2 follows stage 1 without a Stage event of its own
            if exact <= 5:
                mark(("estimate, then " if exact == 1 else "") + f"exact probe {exact} ({event.record.spec.label})")
            if exact == 5:
                stage = "exact probes 6 onwards"
        elif isinstance(event, Finished):
            mark(f"{stage} (then finished: {event.reason})")


if __name__ == "__main__":
    main()
