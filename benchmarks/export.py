"""Export SmolLM2-135M five ways in one run and compare them against the torch model.

fp32, naive int8 (per-tensor dynamic, nothing kept), repaired int8 (checkup-chosen linears
kept in fp32), naive int4 (MatMulNBits, block 32), repaired int4, and the two repaired ones
again with activation-aware scales folded in first (SmoothQuant for int8, AWQ for int4). Prints size, KL, top-1,
perplexity, greedy agreement and latency relative to the fp32 ONNX model.
The fp32 lists come from a checkup on the selection split; every figure printed is on the
evaluation split, which that choice never saw. The sample's weights come from a Q4_1 GGUF
(a 16-level grid per 32-block), so its int4 figures flatter int4 block-32 methods.
Usage: python benchmarks/export.py [--checkup DIR] [--tokens 1024]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import sample_session, timed  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkup", help="reuse a linear-scope checkup (checkup.json folder) with int8-dynamic "
                                          "and int4-g32-asym probes")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--int8-budget", type=float, default=0.02)
    parser.add_argument("--int4-budget", type=float, default=0.08)
    parser.add_argument("--no-treated", action="store_true", help="skip the treated (scaled) variants")
    args = parser.parse_args()

    from modeldoctor.checkup.plan import CheckupPlan
    from modeldoctor.checkup.run import checkup
    from modeldoctor.data import DataSpec
    from modeldoctor.events import Finished
    from modeldoctor.export.pipeline import export_model
    from modeldoctor.report import CheckupReport

    session = sample_session()
    data = session.data(DataSpec(tokens=args.tokens, seq_len=256, knowledge=False))
    selection = data.selection_view()  # the fp32 list is a choice: made on selection text, never on eval
    times: dict[str, float] = {}
    if args.checkup:
        report = CheckupReport.load(args.checkup)
        if report.data.get("split") != "selection":
            sys.exit("--checkup must be a checkup on the selection split (modeldoctor checkup --split selection).")
    else:
        with timed("linear-scope checkup on the selection split (int8-dynamic, int4-g32-asym)", times):
            # Exhaustive, as the Export page's checkup: the predicted KL adds every linear's exact figure.
            report = checkup(session, CheckupPlan(modifications=["int8-dynamic", "int4-g32-asym"], scope="linears",
                                                  knowledge=False, exhaustive=True), selection)
        report.save(Path(tempfile.gettempdir()) / "modeldoctor-export-checkup")
    variants = [("fp32", "fp32", None, [], 1.0), ("naive int8", "int8", None, [], 10.0),
                ("repaired int8", "int8", report, None, args.int8_budget), ("naive int4", "int4", None, [], 10.0),
                ("repaired int4", "int4", report, None, args.int4_budget)]
    rows = []
    with tempfile.TemporaryDirectory() as temp:
        for label, precision, source, keep, budget in variants:
            with timed(f"export {label}", times):
                events = list(export_model(session, data, Path(temp) / label.replace(" ", "-"), precision, source,
                                           keep, budget))
            final = events[-1]
            assert isinstance(final, Finished) and final.report is not None, final
            rows.append((label, budget, final.report))
        if not args.no_treated:
            # Treatments baked into the weights (scales folded), the checkup's fp32 list kept; validated
            # against the untreated model.
            from modeldoctor.treatment.scaling import apply_scaling

            treated = [("smoothed+rep. int8", "int8", "smoothquant", args.int8_budget),
                       ("AWQ+rep. int4", "int4", "awq", args.int4_budget)]
            for label, precision, method, budget in treated:
                session.reset_treatments()
                session.begin_weight_treatment()
                with timed(f"{method} scales", times):
                    apply_scaling(session, data, method, bits=4, group_size=32, symmetric=False)
                session.weights_changed(function_preserving=True)
                with timed(f"export {label}", times):
                    events = list(export_model(session, data, Path(temp) / label.replace(" ", "-").replace("+", "-"),
                                               precision, report, None, budget))
                rows.append((label, budget, events[-1].report))
            session.reset_treatments()
    fp32_size = rows[0][2].validation["size_bytes"]
    print(f"\nSmolLM2-135M exported through optimum-onnx, validated against torch on {data.eval_tokens} evaluation "
          f"tokens; fp32 lists chosen from a checkup on {selection.eval_tokens} selection tokens")
    header = (f"{'variant':<18} {'size MiB':>9} {'% fp32':>7} {'KL mean':>8} {'KL p99':>7} {'top-1':>6} "
              f"{'ppl':>8} {'greedy =':>8} {'latency':>8} {'fp32 kept':>9}  budget")
    print(header)
    print("-" * len(header))
    for label, budget, result in rows:
        v = result.validation
        verdict = f"{'passed' if result.passed else 'over'} {budget:g}" if "rep" in label else "-"
        print(f"{label:<18} {v['size_bytes'] / 2**20:>9.0f} {v['size_bytes'] / fp32_size:>7.0%} {v['kl_mean']:>8.4f} "
              f"{v['kl_p99']:>7.3f} {v['same_top']:>6.1%} {v['ppl']:>8.2f} {v['greedy_identical']:>8.0%} "
              f"{v.get('latency_ratio', 1):>7.2f}x {len(result.excluded_linears):>9}  {verdict}")
    print(f"reference perplexity (torch fp32): {rows[0][2].validation['ppl_ref']:.2f}")
    print("Targets: repaired int8 KL <= 0.02 at <= 45% of fp32 size and <= 0.8x latency; "
          "repaired int4 KL <= 0.08 at <= 40% of fp32 size.")
    print("Times: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()))


if __name__ == "__main__":
    main()
