"""Does the first-stage estimate rank pruning probes as well as quantization ones? (It decided that
pruning probes stay exact: see checkup.estimate.estimable.)

On the sample, 1024 evaluation tokens, knowledge probes off: for each modification and scope, every
probe measured exactly and every probe estimated, side by side. Prints both times, how many
estimates stage 2 would have to verify, the Spearman correlation of the estimates with the exact
figures, the top-10 overlap and the range of estimate/exact.
Usage: python benchmarks/estimate_pruning.py [--tokens 1024] [--linears]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import sample_session, spearman  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--linears", action="store_true", help="also linear scope (slow: 210 exact probes)")
    args = parser.parse_args()
    from modeldoctor.checkup.estimate import estimate_kl
    from modeldoctor.checkup.plan import CheckupPlan
    from modeldoctor.checkup.run import checkup
    from modeldoctor.data import DataSpec

    session = sample_session()
    data = session.data(DataSpec(tokens=args.tokens, seq_len=256, knowledge=False))
    ref = session.reference(data)
    cases = [("prune-wanda-50", "blocks"), ("prune-mag-50", "blocks")] + ([("prune-wanda-50", "linears")]
                                                                           if args.linears else [])
    print(f"SmolLM2-135M, {args.tokens} evaluation tokens, knowledge off")
    for name, scope in cases:
        began = time.perf_counter()
        exact = checkup(session, CheckupPlan(modifications=[name], scope=scope, knowledge=False, exhaustive=True),
                        data)
        exact_s = time.perf_counter() - began
        truth = {p.spec.targets[0]: p.score for p in exact.probes if p.spec.mode == "isolated"}
        targets = list(truth)
        began = time.perf_counter()
        estimates = estimate_kl(session, ref, data, {name: targets})
        estimate_s = time.perf_counter() - began
        est = [estimates[(name, t)] for t in targets]
        true = [truth[t] for t in targets]
        top_true = set(sorted(targets, key=truth.get, reverse=True)[:10])
        top_est = set(sorted(targets, key=lambda t: estimates[(name, t)], reverse=True)[:10])
        ratios = [e / t for e, t in zip(est, true) if t > 0]
        above = sum(e >= 0.5 * exact.plan["threshold"] for e in est)
        print(f"\n{name}, {scope} ({len(targets)} probes): all exact {exact_s:.1f} s, the estimate alone "
              f"{estimate_s:.1f} s; {above} estimates at half the threshold or more (stage 2 would measure them)")
        print(f"  Spearman estimate vs exact {spearman(est, true):.3f}; top-10 overlap {len(top_true & top_est)}/10; "
              f"estimate/exact {min(ratios):.2f}-{max(ratios):.2f}")

if __name__ == "__main__":
    main()
