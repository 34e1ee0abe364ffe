"""Does the checkup predict what onnxruntime's int8 dynamic quantization really does?

Exports SmolLM2-135M once through optimum-onnx, then for a spread of linears (every
down_proj plus a seeded sample of the others) quantizes that single MatMul with
onnxruntime's quantize_dynamic as the export runs it (per-tensor int8, 7-bit levels), measures KL against the fp32 ONNX model
on the evaluation split, and prints the Spearman correlation with the checkup's predicted
per-linear KL. Usage: python benchmarks/fidelity_int8.py [--others 20] [--tokens 1024]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import sample_session, spearman, timed  # noqa: E402


def kl_per_token(ref_logits: np.ndarray, mod_logits: np.ndarray) -> np.ndarray:
    ref = torch.log_softmax(torch.from_numpy(ref_logits).float(), -1)
    mod = torch.log_softmax(torch.from_numpy(mod_logits).float(), -1)
    return (ref.exp() * (ref - mod)).sum(-1).clamp(min=0).flatten().numpy()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--others", type=int, default=20, help="linears sampled besides every down_proj")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import onnx
    import logging

    from modeldoctor.export.quantize import quantize_dynamic_int8

    from modeldoctor.checkup.plan import CheckupPlan
    from modeldoctor.checkup.run import checkup
    from modeldoctor.data import DataSpec
    from modeldoctor.export.mapping import map_linears
    from modeldoctor.export.onnx_export import export_fp32
    from modeldoctor.export.runtime import OnnxCausalLM

    logging.getLogger().setLevel(logging.ERROR)  # onnxruntime's quantizer prints advice per call
    times: dict[str, float] = {}
    session = sample_session()
    data = session.data(DataSpec(tokens=args.tokens, seq_len=256, knowledge=False))
    names = session.anatomy.linear_names()
    down = [n for n in names if n.endswith("mlp.down_proj")]
    others = random.Random(args.seed).sample([n for n in names if n not in down], args.others)
    targets = [n for n in names if n in set(down + others)]

    with timed("checkup prediction", times):
        # Exhaustive: every figure compared with onnxruntime is an exact probe, not a first-stage estimate.
        report = checkup(session, CheckupPlan(modifications=["int8-dynamic"], scope="linears", targets=targets,
                                              knowledge=False, exhaustive=True), data)
    predicted = {p.spec.targets[0]: p.metrics["kl_mean"] for p in report.probes}

    sequences = [row[mask.bool()].numpy()[None] for b in data.eval_batches
                 for row, mask in zip(b.input_ids, b.attention_mask)]
    with tempfile.TemporaryDirectory() as temp:
        temp = Path(temp)
        with timed("optimum-onnx export", times):
            onnx_path = export_fp32(session.model, session.tokenizer, temp / "fp32")
        proto = onnx.load(str(onnx_path))
        mapping, missing = map_linears(proto, session.anatomy)
        del proto
        print(f"mapped {len(mapping)} of {len(session.anatomy.linear_targets())} linears (block linears and the LM "
              f"head) to MatMul nodes; missing: {missing or 'none'}")
        fp32 = OnnxCausalLM(onnx_path)
        reference = [fp32.logits(seq) for seq in sequences]
        torch_logits = [session.model(input_ids=torch.from_numpy(seq)).logits.numpy() for seq in sequences]
        drift = np.concatenate([kl_per_token(t, o) for t, o in zip(torch_logits, reference)]).mean()
        print(f"fp32 ONNX vs torch: mean KL {drift:.2e} (export fidelity)")
        del fp32

        measured = {}
        with timed("onnxruntime single-MatMul quantizations", times):
            for number, name in enumerate(targets, 1):
                out = temp / "q.onnx"
                quantize_dynamic_int8(onnx_path, out, [], external_data=False, only_nodes=[mapping[name]])
                model = OnnxCausalLM(out)
                kls = [kl_per_token(ref, model.logits(seq)) for ref, seq in zip(reference, sequences)]
                measured[name] = float(np.concatenate(kls).mean())
                print(f"  {number:>2}/{len(targets)} {name:<24} predicted {predicted[name]:.5f}  "
                      f"onnxruntime {measured[name]:.5f}", file=sys.stderr)
                del model
                out.unlink()

    pred = [predicted[n] for n in targets]
    meas = [measured[n] for n in targets]
    rho = spearman(pred, meas)
    top = 5
    top_pred = sorted(targets, key=predicted.get, reverse=True)[:top]
    top_meas = sorted(targets, key=measured.get, reverse=True)[:top]
    print(f"\nint8 dynamic (per-tensor) on SmolLM2-135M, {len(targets)} linears "
          f"({len(down)} down_proj + {len(others)} others), {data.eval_tokens} eval tokens")
    print(f"{'linear':<24} {'predicted KL':>13} {'onnxruntime KL':>15} {'ratio':>7}")
    for name in sorted(targets, key=measured.get, reverse=True)[:15]:
        print(f"{name:<24} {predicted[name]:>13.5f} {measured[name]:>15.5f} {predicted[name] / measured[name]:>7.3f}")
    print(f"\nSpearman correlation (predicted vs onnxruntime): {rho:.3f}  (target >= 0.9)")
    print(f"Pearson correlation of log KL: {np.corrcoef(np.log(pred), np.log(meas))[0, 1]:.3f}")
    print(f"Top {top} bleeders predicted: {', '.join(top_pred)}")
    print(f"Top {top} bleeders measured:  {', '.join(top_meas)}")
    print(f"Top-{top} overlap: {len(set(top_pred) & set(top_meas))}/{top}; "
          f"worst linear match: {top_pred[0] == top_meas[0]}")
    print("Times: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()))


if __name__ == "__main__":
    main()
