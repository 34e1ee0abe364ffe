"""The newer kinds of hemorrhage on the sample: low rank (an SVD rank sweep, plain beside
activation-aware), KV-cache quantization per block and for the whole model (with generation
through the cache), and context length (damage by position, RoPE scaling, the long-context probe).

Every figure is on the held-out evaluation split of the built-in text (the activation-aware SVD
fits its input norms on the separate calibration split). SmolLM2-135M's weights come from a
Q4_1 GGUF; none of the figures here is an int4 result, so that origin flatters none of them.
Usage: python benchmarks/hemorrhage_kinds.py [--part svd|kv|context|all]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import sample_session  # noqa: E402


def run(session, plan, spec):
    from modeldoctor.checkup.run import checkup

    data = session.data(spec)
    began = time.perf_counter()
    report = checkup(session, plan, data)
    print(f"[{len(report.probes)} probes in {time.perf_counter() - began:.0f} s; figures on "
          f"{report.measured_on()}]")
    for note in data.notes:
        print(f"  note: {note}")
    return report


def knees(report) -> None:
    for group, curve in report.findings.get("sweeps", {}).items():
        steps = ", ".join(f"{s:g}→{k:.4g}" for s, k in zip(curve["strengths"], curve["scores"]))
        print(f"  {group:<10} whole model: {steps}; last safe {curve['last_safe']}, first bleeding "
              f"{curve['first_bleeding']}, knee {curve['knee']}")
        blocks = curve.get("blocks", {})
        if blocks:
            safe = {b: c["last_safe"] for b, c in blocks.items()}
            never = sorted((int(b) for b, s in safe.items() if s is None))
            print(f"  {'':<10} per block: last safe strength "
                  + ", ".join(f"{b}:{safe[b] if safe[b] is not None else '-'}" for b in sorted(safe, key=int))
                  + (f" (never safe: blocks {never})" if never else ""))


def position_table(report, names) -> None:
    from modeldoctor.checkup.diagnosis import context_curves

    for name, curve in context_curves(report).items():
        if name in names:
            print(f"  {name:<10} mean of {curve['probes']} block probes by position: "
                  + ", ".join(f"{label} {kl:.4g}" for label, kl in zip(curve["labels"], curve["kl"]))
                  + f" (×{curve['growth']:.2f})")


def part_svd(session) -> None:
    from modeldoctor.checkup.plan import CheckupPlan
    from modeldoctor.data import DataSpec
    from modeldoctor.modifications.lowrank import kept_rank, stored_fraction

    print("\n== Low rank: rank sweep per block and whole model, plain SVD beside activation-aware ==")
    percents = (90, 75, 50, 25, 10)
    for p in percents:
        fractions = [stored_fraction(tuple(m.weight.shape), kept_rank(tuple(m.weight.shape), p, None))
                     for m in session.anatomy.blocks[0].linears.values()]
        print(f"  svd-r{p}: the two factors store {min(fractions):.0%}–{max(fractions):.0%} of a block linear's weights")
    plan = CheckupPlan(modifications=[f"svd-r{p}" for p in percents] + [f"svd-aw-r{p}" for p in percents],
                       modes=("sweep",), knowledge=False, exhaustive=True)
    report = run(session, plan, DataSpec(tokens=1024, seq_len=256, knowledge=False))
    knees(report)
    whole = {r.spec.modification: r.score for r in report.by_mode("sweep-model")}
    print("  whole model, plain vs activation-aware mean KL: " + ", ".join(
        f"{p}%: {whole[f'svd-r{p}']:.4g} vs {whole[f'svd-aw-r{p}']:.4g}" for p in percents))
    block = {(r.spec.modification, r.spec.targets[0]): r.score for r in report.by_mode("sweep-block")}
    for p in (50, 25):
        wins = sum(block[(f"svd-aw-r{p}", b)] < block[(f"svd-r{p}", b)] for b in map(str, range(30)))
        print(f"  at {p}%: activation-aware has the lower KL in {wins} of 30 blocks")
    worst = sorted(((k, v) for k, v in block.items() if k[0] == "svd-r50"), key=lambda kv: -kv[1])[:5]
    print("  most fragile blocks at svd-r50: " + ", ".join(f"{t} ({v:.4g})" for (_, t), v in worst))


def part_kv(session) -> None:
    from modeldoctor.checkup.plan import CheckupPlan
    from modeldoctor.data import DataSpec

    print("\n== KV-cache quantization: per block and whole model, 1024-token sequences ==")
    names = ["kv-int8", "kv-fp8", "kv-int4", "k-int4", "v-int4", "kv-int2", "kv-int8-channel", "kv-int4-channel"]
    plan = CheckupPlan(modifications=names, modes=("isolated", "sweep"), knowledge=False, exhaustive=True)
    report = run(session, plan, DataSpec(tokens=1024, seq_len=1024, batch_size=1, knowledge=False))
    for name in names:
        isolated = sorted(report.by_mode("isolated"), key=lambda r: -r.score)
        mine = [r for r in isolated if r.spec.modification == name]
        bleeding = [r.spec.target for r in mine if r.bleeding]
        print(f"  {name:<8} per block: worst " + ", ".join(f"{r.spec.target} ({r.score:.4g})" for r in mine[:4])
              + f"; median {sorted(r.score for r in mine)[len(mine) // 2]:.4g}; {len(bleeding)} of {len(mine)} "
              f"bleed{(': ' + ', '.join(bleeding[:10])) if bleeding else ''}")
    for record in report.by_mode("sweep-model"):
        m = record.metrics
        print(f"  {record.spec.modification:<8} whole model: prefill KL {m['kl_mean']:.4g}, generating through "
              f"the cache KL {m['kl_generation']:.4g} over {int(m['generation_tokens'])} greedy tokens, by "
              "position " + ", ".join(f"{k[len('kl_pos_'):]}: {v:.4g}" for k, v in m.items() if k.startswith("kl_pos_")))
    position_table(report, names)
    from modeldoctor.checkup.diagnosis import diagnose

    for finding in diagnose(report):
        if finding.title.startswith("KV cache in"):
            print(f"  {finding.title} {finding.text}")


def part_context(session) -> None:
    from modeldoctor.checkup.context import DEFAULT_LENGTHS
    from modeldoctor.checkup.plan import CheckupPlan
    from modeldoctor.data import DataSpec

    print("\n== Context length: RoPE scaling and the long-context probe ==")
    names = ["rope-linear-2", "rope-ntk-2", "rope-yarn-2", "rope-yarn-4", "kv-int4", "int8-dynamic"]
    plan = CheckupPlan(modifications=names, knowledge=False, exhaustive=True, targets=["29"],
                       context_lengths=DEFAULT_LENGTHS)
    report = run(session, plan, DataSpec(tokens=1792, seq_len=256, knowledge=False))
    for record in report.by_mode("model"):
        m = record.metrics
        print(f"  {record.spec.modification:<14} whole model on 256-token sequences: KL {m['kl_mean']:.4g}, same top "
              f"{m['same_top']:.1%}, ppl ×{m['ppl_ratio']:.3f}")
    context = report.context
    print(f"  long-context probe on {context['text']}, the model's limit {context['limit']} tokens:")
    print(f"  {'tokens':>7} {'orig tok/s':>10}" + "".join(f" {n:>13}" for n in context["curves"]))
    for i, length in enumerate(context["lengths"]):
        print(f"  {length:>7} {context['tokens_per_s'][i]:>10.0f}"
              + "".join(f" {c['kl'][i]:>13.4g}" for c in context["curves"].values()))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--part", choices=("svd", "kv", "context", "all"), default="all")
    args = parser.parse_args()
    session = sample_session()
    for name, part in (("context", part_context), ("kv", part_kv), ("svd", part_svd)):
        if args.part in (name, "all"):
            part(session)


if __name__ == "__main__":
    main()
