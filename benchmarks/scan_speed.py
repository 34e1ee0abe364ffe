"""Block-level isolated scan of SmolLM2-135M with and without the prefix cache, in one run.

Both scans run the same probes on the same data; the script checks they agree and prints
both times and the speed-up. Usage: python benchmarks/scan_speed.py [--modify int4] [--tokens 1024]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import sample_session  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--modify", default="int4")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--knowledge", action="store_true", help="also score knowledge probes per probe")
    args = parser.parse_args()

    from modeldoctor.checkup.plan import CheckupPlan
    from modeldoctor.checkup.run import checkup
    from modeldoctor.data import DataSpec

    session = sample_session()
    data = session.data(DataSpec(tokens=args.tokens, seq_len=256, knowledge=args.knowledge))
    began = time.perf_counter()
    session.reference(data)
    reference_s = time.perf_counter() - began
    results = {}
    for cached in (False, True):
        # Exhaustive: this measures exact probes (no first-stage estimates), with the knowledge probes
        # on every probe when asked (knowledge_on="all").
        plan = CheckupPlan(modifications=[args.modify], scope="blocks", knowledge=args.knowledge,
                           knowledge_on="all", prefix_cache=cached, exhaustive=True)
        began = time.perf_counter()
        report = checkup(session, plan, data)
        results[cached] = (time.perf_counter() - began, report)
    (full_s, full), (cached_s, cached) = results[False], results[True]
    worst_diff = max(abs(a.metrics["kl_mean"] - b.metrics["kl_mean"]) / max(b.metrics["kl_mean"], 1e-12)
                     for a, b in zip(cached.probes, full.probes))
    blocks = session.anatomy.num_blocks
    print(f"SmolLM2-135M, {args.modify} on each of {blocks} blocks, {data.eval_tokens} eval tokens"
          f"{' + knowledge probes' if args.knowledge else ''}; reference pass {reference_s:.1f} s (shared)")
    print(f"without prefix cache: {full_s:7.1f} s  ({full_s / blocks:.2f} s/probe)")
    print(f"with prefix cache:    {cached_s:7.1f} s  ({cached_s / blocks:.2f} s/probe)")
    print(f"speed-up: {full_s / cached_s:.2f}x; largest relative KL difference between the scans {worst_diff:.1e}")


if __name__ == "__main__":
    main()
