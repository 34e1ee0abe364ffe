"""What other verify rules would cost and give, replayed on one pair of saved checkups.

Stage 2 of a two-stage checkup measures exactly, per modification, every probe estimated at
verify_fraction x the threshold or more, at least the verify_top highest and control_sample others
at random; then it settles (run.py: _to_settle). This script replays that choice for other
rules on the estimates of a saved two-stage checkup, taking each probe's "measurement" from a
saved exhaustive checkup of the same plan, and prints per rule: the probes measured (first round
and settled), the seconds the exhaustive run spent on those probes (what stage 2 would spend),
the wall time that gives with the two-stage run's other costs (reference, estimate, knowledge:
its wall time less its own probes' seconds), and per modification the top 10 against the
exhaustive one and the verdicts on the threshold that differ from it (outliers aside).

First run `python benchmarks/fast_checkup.py --save DIR`, then
`python benchmarks/verify_rules.py DIR`. The sample's weights come from a Q4_1 GGUF, so its int4
figures flatter int4.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

RULES = [  # (label, verify_fraction, verify_top, control_sample, settle)
    ("the issue's default (half the threshold, top 10, 3 controls), settled", 0.5, 10, 3, True),
    ("the issue's default, first round only", 0.5, 10, 3, False),
    ("the threshold, top 10, 3 controls, settled", 1.0, 10, 3, True),
    ("top 10 and 3 controls only, settled", float("inf"), 10, 3, True),
    ("top 10 and 3 controls only, first round only", float("inf"), 10, 3, False),
    ("top 5 and 3 controls only, settled", float("inf"), 5, 3, True),
]


def replay(plan, fast, slow, settle: bool) -> tuple[int, int, float, dict[str, tuple[int, int]], set[int]]:
    """(first-round probes, settled probes, the seconds the exhaustive run spent measuring them,
    per modification (top-10 overlap with the exhaustive one, threshold verdicts that differ from
    it), the indices measured)."""
    from modeldoctor.checkup.run import _to_settle, _to_verify
    from modeldoctor.report.results import ProbeRecord

    exact = {p.spec.index: p for p in slow.probes}
    estimate = {p.spec.index: p.metrics.get("kl_estimated", p.score) for p in fast.probes
                if p.estimated or "kl_estimated" in p.metrics}
    if any(value is None for value in estimate.values()):
        raise SystemExit("The two-stage report has estimates that are not finite numbers; nothing to replay.")
    specs = [p.spec for p in fast.probes if p.spec.index in estimate]
    records = {s.index: ProbeRecord(s, {"kl_mean": estimate[s.index]}, False, "", "", basis="estimated")
               for s in specs}
    seconds = 0.0

    def measure(batch) -> int:
        nonlocal seconds
        for spec in batch:
            measured = exact[spec.index]
            records[spec.index] = dataclasses.replace(
                measured, metrics={"kl_mean": measured.score, "kl_estimated": estimate[spec.index]})
            seconds += measured.seconds - measured.knowledge_seconds
        return len(batch)

    first = measure(_to_verify(plan, specs, records))
    settled = 0
    while settle:
        more, _ = _to_settle(plan, specs, records)
        if not more:
            break
        settled += measure(more)
    quality = {}
    for name in plan.modifications:
        mine = [s for s in specs if s.modification == name]
        top_exact = set(sorted(mine, key=lambda s: -exact[s.index].score)[:10])
        top_here = set(sorted(mine, key=lambda s: -records[s.index].score)[:10])
        differ = sum((records[s.index].score >= plan.threshold) != (exact[s.index].score >= plan.threshold)
                     for s in mine)
        quality[name] = (len(top_exact & top_here), differ)
    return first, settled, seconds, quality, {s.index for s in specs if not records[s.index].estimated}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("saved", type=Path, help="the --save folder of benchmarks/fast_checkup.py")
    args = parser.parse_args()

    from modeldoctor.checkup.plan import CheckupPlan
    from modeldoctor.report import CheckupReport

    fast = CheckupReport.load(args.saved / "two-stage" / "checkup.json")
    slow = CheckupReport.load(args.saved / "exhaustive" / "checkup.json")
    plan = CheckupPlan.from_dict(fast.plan)
    # What the run spent besides measuring its verified estimates: the reference, the estimate,
    # the knowledge scoring, and any probe that is always measured exactly (a rule does not change those).
    others = fast.elapsed_s - sum(p.seconds - p.knowledge_seconds for p in fast.probes if "kl_estimated" in p.metrics)
    replayed = {p.spec.index for p in fast.probes if "kl_estimated" in p.metrics}
    print(f"Saved two-stage run: {fast.elapsed_s:.1f} s wall, of which {others:.1f} s besides measuring its "
          f"{len(replayed)} verified estimates (reference, estimate, knowledge scoring, probes always measured); "
          f"exhaustive run: {slow.elapsed_s:.1f} s. Wall times below are projected: those other costs plus the "
          "exhaustive run's own seconds measuring the probes a rule measures.")
    print(f"Threshold {plan.threshold}; top 10 and verdicts against the exhaustive checkup.\n")
    for label, fraction, top, controls, settle in RULES:
        rule = dataclasses.replace(plan, verify_fraction=fraction, verify_top=top, control_sample=controls)
        first, settled, seconds, quality, chosen = replay(rule, fast, slow, settle)
        if rule == plan and settle and chosen != replayed:  # the replay must choose what the run chose
            print(f"  (the replay of the run's own rule chose {len(chosen ^ replayed)} probes differently from the "
                  "run: its estimates and measurements do not reproduce it)")
        wall = others + seconds
        print(f"{label}:\n  {first} + {settled} probes measured, {seconds:.1f} s of them, about {wall:.0f} s wall "
              f"(projected), {slow.elapsed_s / wall:.1f}x the exhaustive run")
        print("  " + "; ".join(f"{name} top 10 {same}/10, {differ} verdicts differ"
                               for name, (same, differ) in quality.items()))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
