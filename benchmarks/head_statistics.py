"""How an exact probe scores the model's output, side by side on the sample (1024 evaluation tokens).

1. Time: the head and the divergence statistics of one batch of final states, taken two ways:
   logits and a log-softmax a sequence at a time against the full reference distributions (what
   a probe of the head itself still does), and summarise_head + kl_from_states (the LM head a
   slice of the vocabulary at a time over the whole batch, no logits kept; what every probe that
   leaves the head alone does).
2. Agreement: a few probes measured both ways (the second by making the head look hooked), their
   KL and perplexity figures side by side, and for one of them each way's per-token KL against
   float64 logits.

Usage: python benchmarks/head_statistics.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import sample_session  # noqa: E402

PROBES = [("int8-dynamic", "14.self_attn.q_proj"), ("int4-g32-asym", "12.self_attn.v_proj"), ("int4", "15"),
          ("prune-wanda-50", "29"), ("remove", "5")]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import torch

    from modeldoctor.checkup.plan import CheckupPlan
    from modeldoctor.checkup.replay import Replayer
    from modeldoctor.checkup.run import measure
    from modeldoctor.control import RunControl
    from modeldoctor.data import DataSpec
    from modeldoctor.metrics.divergence import DivergenceAccumulator, summarise_head
    from modeldoctor.modifications.base import create, token_mask
    from modeldoctor.report.results import ProbeSpec

    session = sample_session()
    data = session.data(DataSpec(tokens=1024, seq_len=256))
    ref = session.current_reference(data)
    session.input_norms(data)
    replayer, batch, reference = session.replayer, data.eval_batches[0], ref.logprobs[0]
    weight, bias = replayer.plain_head()
    final = ref.traces[0].states[-1]
    print(f"SmolLM2-135M, one batch of {tuple(batch.input_ids.shape)} tokens, vocabulary {weight.shape[0]}")

    def per_sequence():
        divergence = DivergenceAccumulator()
        for rows, logits in replayer.head_parts(final):
            divergence.add(reference.rows(rows), ref.next_logprob[0][rows], logits, batch.input_ids[rows],
                           batch.attention_mask[rows])

    def from_states():
        divergence = DivergenceAccumulator()
        head_input = replayer.head_input(final)
        divergence.add_from_states(reference, ref.next_logprob[0], head_input,
                                   summarise_head(head_input, weight, bias, batch.input_ids), batch.attention_mask)

    times = {"per_sequence": [], "from_states": []}
    for _ in range(args.repeats):  # alternately, so that the machine's drift hits both alike
        for name, run in (("per_sequence", per_sequence), ("from_states", from_states)):
            began = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - began)
    slow, fast = (statistics.median(times[k]) for k in ("per_sequence", "from_states"))
    print(f"\n1. Head and statistics, median of {args.repeats}:")
    print(f"  logits and log-softmax a sequence at a time: {slow:.3f} s")
    print(f"  summarise_head + kl_from_states:             {fast:.3f} s  ({slow / fast:.2f}x faster)")

    print("\n2. Probes measured both ways (kl_mean, kl_p99, ppl; relative difference):")
    plan = CheckupPlan(knowledge=False, attention=False)
    for name, target in PROBES:
        mod = create(name)
        spec = ProbeSpec(0, name, mod.family, "isolated", (target,), session.anatomy.block_of(target))
        fast_metrics = measure(session, ref, data, plan, spec, RunControl()).metrics
        plain_head = Replayer.plain_head
        Replayer.plain_head = lambda self: None  # as if hooked: the full distributions
        try:
            full_metrics = measure(session, ref, data, plan, spec, RunControl()).metrics
        finally:
            Replayer.plain_head = plain_head
        cells = [f"{key} {fast_metrics[key]:.6g} / {full_metrics[key]:.6g} "
                 f"({abs(fast_metrics[key] - full_metrics[key]) / abs(full_metrics[key]):.1e})"
                 for key in ("kl_mean", "kl_p99", "ppl")]
        print(f"  {name:<15} {target:<20} " + "; ".join(cells))

    name, target = PROBES[0]
    block = session.anatomy.block_of(target)
    with create(name).applied(session.mod_context(data), [target]), token_mask(session.mod_context(data),
                                                                              batch.attention_mask):
        run = replayer.run_from(ref.traces[0], block, head=False)
        modified_final = run.states[max(run.states)]
        head_input = replayer.head_input(modified_final)
        summary = summarise_head(head_input, weight, bias, batch.input_ids)
        logits = torch.cat([part for _, part in replayer.head_parts(modified_final)])
    truth_ref = torch.log_softmax(replayer.head_input(final).double() @ weight.double().T, -1)
    truth_mod = torch.log_softmax(head_input.double() @ weight.double().T, -1)
    truth = (truth_ref.exp() * (truth_ref - truth_mod)).sum(-1)
    ways = {"from states": reference.kl_from_states(head_input, summary),
            "full distributions": reference.kl_to(torch.log_softmax(logits.float(), -1))}
    print(f"\n  {name} {target}: per-token KL against float64 logits (mean KL {float(truth.mean()):.6g} nats)")
    for way, kl in ways.items():
        error = (kl.double() - truth).abs()
        print(f"    {way:<19} mean KL {float(kl.double().mean()):.6g}; per-token error mean {float(error.mean()):.1e}, "
              f"largest {float(error.max()):.1e} nats")


if __name__ == "__main__":
    main()
