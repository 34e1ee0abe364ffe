"""Stage 1's estimate taken at each linear's own point against taken at its block's output, on
the sample: seconds for every linear of int8-dynamic, int4-g32-asym and int3-g32 (633 probes,
1024 evaluation tokens), and per family the Spearman correlation with the exhaustive figures and
how many of the exhaustive top 10 the estimates' top 10 holds.

The exhaustive figures come from a saved report: run `python benchmarks/fast_checkup.py --save DIR`
first, then `python benchmarks/estimate_points.py DIR/exhaustive/checkup.json`. The sample's
weights come from a Q4_1 GGUF, so its int4 figures flatter int4.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import sample_session, spearman  # noqa: E402

FAMILIES = ["int8-dynamic", "int4-g32-asym", "int3-g32"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("exhaustive", type=Path, help="checkup.json of an exhaustive linear-scope checkup of the families")
    parser.add_argument("--tokens", type=int, default=1024)
    args = parser.parse_args()

    from modeldoctor.checkup.estimate import estimate_kl
    from modeldoctor.checkup.plan import scope_targets
    from modeldoctor.data import DataSpec
    from modeldoctor.report import CheckupReport

    report = CheckupReport.load(args.exhaustive)
    exact = {(p.spec.modification, p.spec.targets[0]): p.score for p in report.probes}
    session = sample_session()
    data = session.data(DataSpec(tokens=args.tokens, seq_len=256))
    ref = session.current_reference(data)
    targets = scope_targets(session.anatomy, "linears")
    print(f"SmolLM2-135M, {args.tokens} evaluation tokens, {len(targets)} linears x {len(FAMILIES)} families")
    for local, where in ((True, "at each linear's point"), (False, "at the block's output")):
        began = time.perf_counter()
        estimates = estimate_kl(session, ref, data, {f: targets for f in FAMILIES}, local=local)
        print(f"\n{where}: {time.perf_counter() - began:.1f} s")
        for family in FAMILIES:
            keys = [k for k in exact if k[0] == family]
            top_exact = set(sorted(keys, key=exact.get, reverse=True)[:10])
            top_estimate = set(sorted(keys, key=estimates.get, reverse=True)[:10])
            ratios = sorted(exact[k] / estimates[k] for k in keys if estimates[k] > 0)
            print(f"  {family:<14} Spearman {spearman([estimates[k] for k in keys], [exact[k] for k in keys]):.3f}, "
                  f"top 10 {len(top_exact & top_estimate)}/10, measured / estimated {ratios[0]:.2f} to "
                  f"{ratios[-1]:.2f} (median {ratios[len(ratios) // 2]:.2f})")


if __name__ == "__main__":
    main()
