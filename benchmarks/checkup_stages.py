"""Where a checkup's time goes, stage by stage, on the sample (1024 evaluation tokens).

Runs the two checkups that benchmarks/fast_checkup.py times (the linear-scope two-stage checkup of
int8-dynamic, int4-g32-asym and int3-g32; the default block-scope checkup that the README's set-up
command runs) and prints, for each, the seconds from the start to each stage's beginning and the
seconds each stage took: reference, calibration, estimate, exact probes, knowledge.

Usage: python benchmarks/checkup_stages.py [--tokens 1024]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import sample_session  # noqa: E402


def stages(plan, spec) -> list[tuple[str, float]]:
    """(stage, seconds since the start when it began) for one checkup, ending with ("end", total)."""
    from modeldoctor.checkup.run import run_checkup
    from modeldoctor.events import Finished, LogMessage, Stage

    session = sample_session()  # fresh: the reference pass is part of the time
    data = session.data(spec)
    began = time.perf_counter()
    marks = []
    for event in run_checkup(session, plan, data):
        now = time.perf_counter() - began
        if isinstance(event, Stage):
            marks.append((event.name, now))
        elif isinstance(event, LogMessage) and event.message.startswith("Estimated "):
            marks.append(("exact probes", now))  # stage 2 starts once the estimates are in
        elif isinstance(event, Finished):
            marks.append(("end", now))
    return marks


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=1024)
    args = parser.parse_args()

    from modeldoctor.checkup.plan import CheckupPlan
    from modeldoctor.data import DataSpec

    spec = DataSpec(tokens=args.tokens, seq_len=256)
    checkups = {"linear scope, int8-dynamic + int4-g32-asym + int3-g32":
                CheckupPlan(modifications=["int8-dynamic", "int4-g32-asym", "int3-g32"], scope="linears"),
                "default (block scope, int8-dynamic, int4, prune-wanda-50, remove)": CheckupPlan()}
    print(f"SmolLM2-135M, {args.tokens} evaluation tokens; seconds of wall time")
    for title, plan in checkups.items():
        marks = stages(plan, spec)
        print(f"\n{title}: {marks[-1][1]:.1f} s")
        for (name, start), (_, end) in zip(marks, marks[1:]):
            print(f"  {name:<13} from {start:6.1f} s  {end - start:6.1f} s")


if __name__ == "__main__":
    main()
