"""The two-stage checkup against the exhaustive one, side by side in one run on the sample.

1. Linear scope, int8-dynamic, int4-g32-asym and int3-g32, 1024 evaluation tokens: wall time of
   the two-stage checkup and of the exhaustive one (each on a freshly loaded model, so both pay
   for their reference pass), the speed-up, and per modification the top-10 overlap and the
   Spearman correlation over every linear against the exhaustive figures, and the bleeding
   verdicts that differ from the exhaustive checkup's; and the floor that the issue's verify rule
   puts under any two-stage run: the exhaustive run's own seconds on the probes that rule measures.
2. The checkup that the README's set-up command runs (block scope, int8-dynamic, int4,
   prune-wanda-50, remove; 1024 tokens; knowledge probes on): its wall time.
3. Block-scope exact probes: the seconds of an exact int4 probe of a block against the seconds of
   replaying the blocks it must re-run (blocks i..N-1 and the head, nothing else).

The sample's weights come from a Q4_1 GGUF, so its int4 figures flatter int4 (its linears lie
on a 16-level grid per 32-block). Usage: python benchmarks/fast_checkup.py [--tokens 1024]
[--skip-exhaustive] [--save DIR] (DIR gets each checkup's checkup.json and .csv, for a closer look)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import sample_session, spearman  # noqa: E402

FAMILIES = ["int8-dynamic", "int4-g32-asym", "int3-g32"]


def say(text: str = "") -> None:
    print(text, flush=True)


def timed_checkup(plan, spec):
    from modeldoctor.checkup.run import checkup

    session = sample_session()  # fresh: the reference pass is part of the time
    began = time.perf_counter()
    report = checkup(session, plan, session.data(spec))
    return report, time.perf_counter() - began, session


def first_round_floor(plan, fast, slow) -> tuple[int, float]:
    """How many probes the issue's verify rule measures in stage 2 before any settling (chosen
    again from the two-stage report's estimates, as the run chose them) and the seconds the
    exhaustive run spent measuring those same probes (its knowledge scoring left out): what any
    two-stage run under that rule spends on them at the least."""
    from verify_rules import replay

    first, _, seconds, _, _ = replay(plan, fast, slow, settle=False)
    return first, seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--skip-exhaustive", action="store_true", help="only the two-stage runs")
    parser.add_argument("--save", type=Path, help="a folder for each checkup's report")
    args = parser.parse_args()

    def keep(report, name: str) -> None:
        if args.save:
            report.save(args.save / name)

    from modeldoctor.checkup.plan import CheckupPlan
    from modeldoctor.data import DataSpec

    spec = DataSpec(tokens=args.tokens, seq_len=256)
    say(f"SmolLM2-135M, {args.tokens} evaluation tokens; knowledge probes scored after the probes on each "
        "modification's 3 worst bleeding probes (the default).")

    # 1. linear scope, three families
    plan = CheckupPlan(modifications=FAMILIES, scope="linears")
    fast, fast_s, _ = timed_checkup(plan, spec)
    keep(fast, "two-stage")
    measured = sum(not p.estimated for p in fast.probes)
    say(f"\n1. Linear scope, {', '.join(FAMILIES)}: {len(fast.probes)} probes")
    say(f"two-stage:  {fast_s:7.1f} s wall, {measured} probes measured exactly, "
        f"{len(fast.probes) - measured} estimated only")
    for name, agreement in fast.findings["estimate"].items():
        miss = agreement["largest_miss"]
        say(f"  {name:<14} verified {agreement['verified']:>3}: estimate vs measured Spearman "
            f"{agreement['spearman']:.3f}, largest miss {miss['target']} (estimated {miss['estimated']:.4f}, "
            f"measured {miss['measured']:.4f}, ×{miss['ratio']:.2f})")
    if not args.skip_exhaustive:
        slow, slow_s, _ = timed_checkup(CheckupPlan(modifications=FAMILIES, scope="linears", exhaustive=True), spec)
        keep(slow, "exhaustive")
        say(f"exhaustive: {slow_s:7.1f} s wall, {len(slow.probes)} probes measured exactly")
        say(f"speed-up: {slow_s / fast_s:.1f}x (targets: two-stage <= 90 s, >= 20x)")
        say(f"\n  {'modification':<14} {'top-10 same':>11} {'Spearman, final':>16} {'Spearman, estimates':>20}")
        for name in FAMILIES:
            exact = {p.spec.targets[0]: p.score for p in slow.probes if p.spec.modification == name}
            final = {p.spec.targets[0]: p.score for p in fast.probes if p.spec.modification == name}
            guesses = {p.spec.targets[0]: p.metrics.get("kl_estimated", p.score) if not p.estimated else p.score
                       for p in fast.probes if p.spec.modification == name}
            targets = list(exact)
            top_exact = set(sorted(targets, key=exact.get, reverse=True)[:10])
            top_fast = set(sorted(targets, key=final.get, reverse=True)[:10])
            say(f"  {name:<14} {len(top_exact & top_fast):>8}/10 "
                f"{spearman([final[t] for t in targets], [exact[t] for t in targets]):>16.3f} "
                f"{spearman([guesses[t] for t in targets], [exact[t] for t in targets]):>20.3f}")
            say(f"    exhaustive top 10: {', '.join(sorted(top_exact, key=exact.get, reverse=True))}")
            missed = top_exact - top_fast
            if missed:
                say(f"    missed by the two-stage top 10: {', '.join(sorted(missed, key=exact.get, reverse=True))}")
        say("  (targets: the same top 10, Spearman >= 0.9 over every linear)")
        verdicts = {(p.spec.modification, p.spec.targets[0]): p.bleeding for p in slow.probes}
        differ = [p for p in fast.probes if p.bleeding != verdicts[(p.spec.modification, p.spec.targets[0])]]
        say(f"  bleeding verdicts that differ from the exhaustive checkup's: {len(differ)} of {len(fast.probes)} "
            f"({sum(verdicts.values())} bleed there)" + "".join(
                f"\n    {p.spec.modification} {p.spec.targets[0]}: {'bleeding' if p.bleeding else 'healthy'} here, "
                f"{p.basis} {p.score:.4f}" for p in differ))
        first, floor = first_round_floor(plan, fast, slow)
        say(f"  floor under the issue's verify rule: its first round here is {first} probes (at half the "
            f"threshold or more, the top {plan.verify_top}, {plan.control_sample} controls per modification), which "
            f"took {floor:.1f} s to measure in the exhaustive run itself; a two-stage checkup that measures them "
            f"spends that before any reference, estimate, settling or knowledge scoring, so its speed-up stays "
            f"below {slow_s / floor:.1f}x")

    # 2. the README's default checkup
    default = CheckupPlan()
    report, default_s, session = timed_checkup(default, spec)
    keep(report, "default")
    measured = sum(not p.estimated for p in report.probes)
    say(f"\n2. Default checkup ({', '.join(default.modifications)}, block scope): {default_s:.1f} s wall, "
        f"{len(report.probes)} probes, {measured} measured exactly (target <= 180 s)")

    # 3. exact block probes against the blocks they re-run
    from modeldoctor.checkup.run import measure
    from modeldoctor.control import RunControl
    from modeldoctor.report.results import ProbeSpec

    data = session.data(spec)
    ref = session.current_reference(data)
    exact_plan = CheckupPlan(modifications=["int4"], knowledge=False, attention=False)
    say("\n3. Exact int4 block probes (no knowledge probes) against a bare replay of the same blocks + head:")
    factors = []
    for block in (0, 10, 20, 29):
        probe = ProbeSpec(0, "int4", "quantize", "isolated", (str(block),), block)
        began = time.perf_counter()
        for _ in range(3):
            measure(session, ref, data, exact_plan, probe, RunControl())
        probe_s = (time.perf_counter() - began) / 3
        began = time.perf_counter()
        for _ in range(3):
            for trace in ref.traces:
                session.replayer.run_from(trace, block, keep_states=False)
        replay_s = (time.perf_counter() - began) / 3
        factors.append(probe_s / replay_s)
        say(f"  block {block:>2}: probe {probe_s:.2f} s, replay {replay_s:.2f} s, factor {probe_s / replay_s:.2f}")
    say(f"  mean factor {sum(factors) / len(factors):.2f} (target <= 1.3)")


if __name__ == "__main__":
    main()
