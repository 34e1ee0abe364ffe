"""Treat SmolLM2-135M every way the treatment issue names, in one run, and print the table.

Fits use the calibration split; every figure is measured on the held-out evaluation split
against the untreated model.
  int8 dynamic (whole model): naive / SmoothQuant scaling / + mixed precision
  int4 weight-only, group 32: naive / AWQ scaling / + mixed precision at a 10 % budget
  50 % unstructured pruning: magnitude / Wanda / gradient-aware
  temperature calibration of the int4 model: KL before / after
  knowledge probes: original / int4 / int4 + best prompt / int4 + per-input selection
Usage: python benchmarks/treatment.py [--tokens 1024] [--budget 0.10] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import sample_session, timed  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--budget", type=float, default=0.10)
    parser.add_argument("--int4", default="int4-g32-asym", help="the weight-only int4 modification to treat")
    parser.add_argument("--json", help="also write every outcome to this file")
    parser.add_argument("--only", choices=("int8", "int4", "prune"), action="append",
                        help="run only these parts (repeatable); default: all")
    args = parser.parse_args()

    from modeldoctor.data import DataSpec
    from modeldoctor.treatment.base import TreatmentPlan
    from modeldoctor.treatment.run import treat

    session = sample_session()
    data = session.data(DataSpec(tokens=args.tokens, seq_len=256, calibration_tokens=512, selection_tokens=512))
    runs = {
        "int8": TreatmentPlan(["smoothquant", "mixed-precision"], target="int8-dynamic", budget=args.budget),
        "int4": TreatmentPlan(["awq", "mixed-precision", "calibrate-temperature", "recovery-prompts"],
                              target=args.int4, budget=args.budget),
        "prune": TreatmentPlan(["prune-grad"], target="none", sparsity=0.5),
    }
    runs = {k: v for k, v in runs.items() if not args.only or k in args.only}
    reports, times = {}, {}
    for key, plan in runs.items():
        session.reset_treatments()
        with timed(key, times):
            reports[key] = treat(session, plan, data)
    session.reset_treatments()

    def outcome(key, name):
        return next(o for o in reports[key].outcomes if o.name == name)

    rows = []

    def row(group, label, figures, note=""):
        rows.append((group, label, figures.get("kl_mean"), figures.get("same_top"), figures.get("ppl"), note))

    print(f"\nSmolLM2-135M-Instruct (weights from a Q4_1 GGUF: int4 figures flatter methods that recover its grid). "
          f"Fits on {data.calibration_tokens} calibration tokens, every choice (roll-back, keep list, α, method, "
          f"temperature, prompt) on {data.selection_tokens} selection tokens, every figure below on "
          f"{data.eval_tokens} held-out evaluation tokens that no choice saw; reference perplexity "
          f"{next(iter(reports.values())).reference['ppl']:.3f} (evaluation split)")
    if "int8" in reports:
        int8_rows(outcome, row, args.budget)
    if "int4" in reports:
        int4_rows(outcome, row, args.budget, args.int4)
    if "prune" in reports:
        prune = outcome("prune", "prune-grad")
        for method in prune.table:
            row("50 % unstructured", method["method"], method,
                f"α = {prune.details['alpha']:g}" if method["method"] == "gradient-aware" else "")
    if "int4" in reports:
        temp = outcome("int4", "calibrate-temperature")
        row("temperature (int4 model)", "T = 1", temp.before)
        row("temperature (int4 model)", f"T = {temp.details['temperature']:.3f}", temp.after,
            "applied" if temp.applied else "not applied")
    print(f"\n| {'treatment':<26} | {'variant':<24} | {'mean KL':>8} | {'top-1':>6} | {'perplexity':>10} | note")
    print(f"|{'-' * 28}|{'-' * 26}|{'-' * 10}|{'-' * 8}|{'-' * 12}|------")
    for group, label, kl, top, ppl, note in rows:
        print(f"| {group:<26} | {label:<24} | {kl:>8.4f} | {top:>6.1%} | {ppl:>10.3f} | {note}")
    if "int4" in reports:
        for line in outcome("int4", "calibrate-temperature").table:
            print(f"  generations under {line['decoding']} at T = {line['temperature']:.3f}: tokens kept "
                  f"{line['token_agreement']:.0%}, first divergence {line['first_divergence']:.1f}, "
                  f"trajectory KL {line['kl_trajectory']:.3f}")
        knowledge = outcome("int4", "recovery-prompts").details
        acc = knowledge["accuracy"]
        print(f"\nKnowledge probes (held-out half, {knowledge['evaluation_probes']} probes): original "
              f"{acc['original']:.1%}, {args.int4} {acc['compressed']:.1%}, + best prompt {acc['best_prompt']:.1%} "
              f"(\"{knowledge['best_prompt'] or 'none'}\"), + per-input selection {acc['per_input']:.1%}")
    print("\nTimes: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({k: r.to_dict() for k, r in reports.items()}, indent=1))


def int8_rows(outcome, row, budget) -> None:
    smooth, mixed8 = outcome("int8", "smoothquant"), outcome("int8", "mixed-precision")
    row("int8 dynamic", "naive", smooth.before)
    row("int8 dynamic", "SmoothQuant scaling", smooth.after, "applied" if smooth.applied else "rolled back")
    row("int8 dynamic", f"+ mixed precision {budget:.0%}", mixed8.after,
        f"{len(mixed8.details['kept'])} linears fp32" + ("" if mixed8.applied else ", rejected"))


def int4_rows(outcome, row, budget, name) -> None:
    awq, mixed4 = outcome("int4", "awq"), outcome("int4", "mixed-precision")
    row(name, "naive", awq.before)
    row(name, "AWQ scaling", awq.after, "applied" if awq.applied else "rolled back")
    row(name, f"+ mixed precision {budget:.0%}", mixed4.after,
        f"{len(mixed4.details['kept'])} linears fp32" + ("" if mixed4.applied else ", rejected"))


if __name__ == "__main__":
    main()
