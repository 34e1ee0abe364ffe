"""The command line: a thin consumer of the engine's calls and events."""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

from modeldoctor.checkup import KNOWLEDGE_TOP
from modeldoctor.errors import ModelDoctorError
from modeldoctor.export import PRECISIONS as PRECISION_CHOICES

EXIT_USER_ERROR = 2
EXIT_INTERNAL = 1
EXIT_CANCELLED = 130


def _model_path(text: str) -> Path:
    """'sample' names the bundled sample model (fetched on first use)."""
    if text == "sample":
        from modeldoctor.model.sample import ensure_sample

        return ensure_sample(lambda message: print(message, file=sys.stderr))
    return Path(text)


def _open_session(args):
    from modeldoctor.session import Session

    path = _model_path(args.model)
    print(f"Loading {path} …", file=sys.stderr)
    return Session.open(path, allow_pickle=args.allow_pickle, dtype=getattr(args, "dtype", "auto"),
                        device=getattr(args, "device", "auto"))


def cmd_app(args) -> int:
    try:
        from modeldoctor.gui.app import run_app
    except ImportError as exc:
        raise ModelDoctorError(f"The desktop app cannot start: {exc}. Reinstall with packaging/install.sh.") from None
    return run_app(args.model)


def cmd_info(args) -> int:
    session = _open_session(args)
    width = max(len(k) for k, _ in session.summary.lines())
    for key, value in session.summary.lines():
        print(f"{key:<{width}}  {value}")
    return 0


def cmd_sample(args) -> int:
    from modeldoctor.model.sample import ensure_sample

    print(ensure_sample(lambda message: print(message, file=sys.stderr)))
    return 0


def cmd_modifications(args) -> int:
    from modeldoctor.modifications.base import PRESETS, families

    for family in families():
        print(f"{', '.join(family.examples):<60} {family.summary}")
    for name, members in PRESETS.items():
        print(f"{name:<60} preset: {', '.join(members)}")
    return 0


def _format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}" if seconds < 3600 else f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class _ProgressBar:
    """A tqdm bar whose ETA is the engine's (probe costs by position, not a plain average)."""

    def __init__(self, total: int, quiet: bool, unit: str = "probes") -> None:
        from tqdm import tqdm

        self.eta, self.unit = "?", unit
        owner = self

        class Bar(tqdm):
            @property
            def format_dict(self):
                return {**super().format_dict, "engine_eta": owner.eta}

        self.bar = Bar(total=total, unit=unit, file=sys.stderr, disable=quiet,
                       bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed} elapsed, "
                                  "{engine_eta} left]")

    def set_total(self, total: int) -> None:
        self.bar.total = total

    def update(self, done: int, eta_s: float | None, eta_range: tuple[float, float] | None = None) -> None:
        self.eta = _format_seconds(eta_s)
        if eta_range is not None and _format_seconds(eta_range[0]) != _format_seconds(eta_range[1]):
            self.eta = f"{_format_seconds(eta_range[0])}–{_format_seconds(eta_range[1])}, about {self.eta}"
        self.bar.update(done - self.bar.n)

    def describe(self, text: str) -> None:
        self.bar.set_description(text[:40], refresh=False)

    def write(self, text: str) -> None:
        self.bar.write(text, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()


def cmd_checkup(args) -> int:
    import signal

    from modeldoctor.checkup.plan import CheckupPlan
    from modeldoctor.checkup.run import run_checkup
    from modeldoctor.control import RunControl
    from modeldoctor.data import DataSpec
    from modeldoctor.events import Failed, Finished, LogMessage, PlanReady, Progress, ProbeResult, Stage
    from modeldoctor.report import CheckupReport

    resume = CheckupReport.load(Path(args.resume).expanduser()) if args.resume else None
    if resume is not None:  # the plan and the text are the earlier run's
        if "spec" not in resume.data:
            raise ModelDoctorError(f"{args.resume} was saved by an older version and cannot be resumed.")
        plan = CheckupPlan.from_dict(resume.plan)
        spec = DataSpec(**resume.data["spec"])
        print(f"Resuming the checkup in {args.resume}: {sum(not r.estimated for r in resume.probes)} probes "
              "measured so far.", file=sys.stderr)
    else:
        plan = CheckupPlan(
            modifications=[m.strip() for m in args.modify.split(",") if m.strip()], scope=args.scope,
            modes=tuple(m.strip() for m in args.mode.split(",") if m.strip()), threshold=args.threshold,
            knowledge=not args.no_knowledge, knowledge_on=args.knowledge_on, prefix_cache=not args.no_prefix_cache,
            targets=[t.strip() for t in args.targets.split(",")] if args.targets else None,
            exhaustive=args.exhaustive, verify_top=args.verify_top,
            context_lengths=_context_lengths(args.context_lengths),
        )
        source = args.data if args.data in ("builtin", "self") else str(Path(args.data).expanduser())
        spec = DataSpec(source=source, tokens=args.tokens, seq_len=args.seq_len,
                        calibration_tokens=args.calibration_tokens, selection_tokens=args.selection_tokens,
                        knowledge=not args.no_knowledge, seed=args.seed,
                        split="selection" if args.split == "selection" else "eval")
    plan.validate()  # fail on a bad plan before the slow model load
    session = _open_session(args)
    print(f"Preparing evaluation data ({spec.describe()}) …", file=sys.stderr)
    data = session.data(DataSpec(**{**spec.__dict__, "split": "eval"}))
    if spec.split == "selection":  # figures that will make choices (e.g. an export's fp32 list)
        data = data.selection_view()
        data.require_selection("A checkup on the selection text")
        print(f"Measuring on the selection split ({data.eval_tokens} tokens), not the evaluation text.",
              file=sys.stderr)
    out = Path(args.out if args.out else (args.resume or "checkup-results")).expanduser()
    control = RunControl()
    bar = None
    final = None

    def first_interrupt(signum, frame):  # stop at the next checkpoint and keep what was measured
        control.cancel()
        print("\nCancelling after the current step (Ctrl+C again to stop at once) …", file=sys.stderr)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    previous = signal.signal(signal.SIGINT, first_interrupt)
    events = run_checkup(session, plan, data, control, resume=resume, autosave=out)

    def say(line: str) -> None:
        if bar is not None:
            bar.write(line)  # on a line of its own, above the bar
        else:
            print(line, file=sys.stderr)

    try:
        for event in events:
            if isinstance(event, Stage):
                say(f"{event.name.capitalize()}: {event.detail}")
            elif isinstance(event, LogMessage):
                say(("warning: " if event.level == "warning" else "") + event.message)
            elif isinstance(event, PlanReady):
                bar = _ProgressBar(len(event.probes), args.quiet)
            elif isinstance(event, ProbeResult) and bar is not None:
                bar.describe(event.record.spec.label)
            elif isinstance(event, Progress) and bar is not None:
                if event.stage != bar.unit:  # the knowledge stage after the probes: a bar of its own
                    bar.close()
                    bar = _ProgressBar(event.total, args.quiet, unit=event.stage)
                bar.set_total(event.total)  # settling adds probes to measure again
                bar.update(event.done, event.eta_s, event.eta_range)
            elif isinstance(event, Failed):
                if bar is not None:
                    bar.close()
                if event.details:
                    _log_details(event.details)
                raise ModelDoctorError(event.message)
            elif isinstance(event, Finished):
                final = event
    except KeyboardInterrupt:  # the second Ctrl+C: the autosaved progress is what remains
        events.close()  # unwinds the probe's context managers: the model is restored
        if bar is not None:
            bar.close()
        print(f"Stopped. The progress saved last is in {out} (resume with --resume {out}).", file=sys.stderr)
        return EXIT_CANCELLED
    finally:
        signal.signal(signal.SIGINT, previous)
    if bar is not None:
        bar.close()
    report = final.report
    path = report.save(out)
    print_report(report, args.top)
    print(f"\nSaved {path} and {path.with_suffix('.csv').name} ({report.status}, {report.elapsed_s:.0f} s).")
    if report.status == "cancelled":
        print(f"Cancelled: {sum(not r.estimated for r in report.probes)} measured probes kept; continue with "
              f"modeldoctor checkup {args.model} --resume {out}", file=sys.stderr)
        return EXIT_CANCELLED
    return 0


def _context_lengths(text: str | None) -> tuple[int, ...]:
    if not text:
        return ()
    from modeldoctor.checkup.context import DEFAULT_LENGTHS

    if text.strip() == "auto":
        return DEFAULT_LENGTHS
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ModelDoctorError(f"--context-lengths takes whole numbers of tokens, comma-separated, or auto "
                               f"(got '{text}').") from None


def print_report(report, top: int = 15) -> None:
    ref = report.reference
    knowledge = report.reference_knowledge()
    print(f"\nFigures on {report.measured_on()}.")
    print(f"Reference: perplexity {ref.get('ppl', float('nan')):.3f} on {int(ref.get('tokens', 0))} tokens"
          + (f", knowledge probes {knowledge:.1%}" if knowledge is not None else ""))
    threshold = report.findings.get("threshold", report.plan.get("threshold"))
    ranked = [p for p in report.probes if p.spec.mode == "isolated"]
    ranked.sort(key=lambda p: p.score, reverse=True)
    bleeding = [p for p in ranked if p.bleeding]
    print(f"\n{len(bleeding)} of {len(ranked)} isolated probes bleed (mean KL > {threshold:g} nats, or outliers).")
    routed = any("routing_flip_rate" in p.metrics for p in ranked)  # a mixture of experts: its routes
    if ranked:
        header = (f"{'#':>3}  {'probe':<34} {'KL mean ± se':>18} {'KL p99':>8} {'same top':>8} {'ppl ×':>7} "
                  f"{'knowl.':>7}{' flips' if routed else ''}  verdict")
        print(header)
        print("-" * len(header))
        for rank, probe in enumerate(ranked[:top], 1):
            m = probe.metrics
            knowl = m.get("knowledge_accuracy")
            verdict = probe.severity if probe.bleeding else "healthy"
            if probe.estimated:  # only the first stage's figure: no spread, no other statistics
                print(f"{rank:>3}  {probe.spec.label[:34]:<34} {m['kl_mean']:>9.4f} estimated {'-':>8} {'-':>8} "
                      f"{'-':>7} {'-':>7}  {verdict} (estimated)")
                continue
            print(f"{rank:>3}  {probe.spec.label[:34]:<34} {m['kl_mean']:>9.4f} ± {m['kl_stderr']:<6.4f} "
                  f"{m['kl_p99']:>8.3f} {m['same_top']:>8.1%} {m['ppl_ratio']:>7.3f} "
                  f"{(f'{knowl:.0%}' if knowl is not None else '-'):>7}{_flips(m) if routed else ''}  {verdict}")
    from modeldoctor.checkup.diagnosis import estimate_summary

    for line in estimate_summary(report):
        print("\n" + line)
    _print_expert_usage(report)
    from modeldoctor.checkup.diagnosis import prefill_vs_decode

    call_shapes = prefill_vs_decode(report)
    if call_shapes:
        print("\nPrefill vs decode under int8 dynamic (one activation range per sequence vs per token), mean KL:")
        header = f"  {'linear':<34} {'prefill':>9} {'decode':>9} {'ratio':>7}"
        print(header)
        print("  " + "-" * (len(header) - 2))
        for row in call_shapes[:top]:
            print(f"  {row['linear'][:34]:<34} {row['prefill']:>9.3g} {row['decode']:>9.3g} {row['ratio']:>7.2f}")
    whole = report.by_mode("model")
    if whole:
        print("\nWhole-model changes (RoPE scaling), mean KL on the evaluation text:")
        for probe in whole:
            m = probe.metrics
            print(f"  {probe.spec.modification:<20} KL {m['kl_mean']:.4f} ± {m['kl_stderr']:.4f}, same top "
                  f"{m['same_top']:.1%}, ppl ×{m['ppl_ratio']:.3f}  {probe.severity if probe.bleeding else 'healthy'}")
    decoding = report.by_mode("decoding")
    if decoding:
        print("\nDecoding settings against greedy decoding:")
        for probe in decoding:
            m = probe.metrics
            print(f"  {probe.spec.modification:<20} tokens kept {m['token_agreement']:.0%}, first divergence at "
                  f"{m['first_divergence']:.1f}, trajectory KL {m['kl_trajectory']:.3f}  "
                  f"{probe.severity if probe.bleeding else 'healthy'}")
    for group, curve in report.findings.get("sweeps", {}).items():
        steps = ", ".join(f"{s:g}→{k:.3g}" for s, k in zip(curve["strengths"], curve["scores"]))
        print(f"\nSweep {group} (whole model, strength→mean KL): {steps}")
    context = report.context
    if context.get("lengths"):
        print(f"\nLong-context probe, whole model, mean KL by length ({context['text']}; the model's limit: "
              f"{context.get('limit') or 'not stated'} tokens):")
        header = f"  {'tokens':>8} {'original tok/s':>15}" + "".join(f" {name[:14]:>14}" for name in context["curves"])
        print(header)
        print("  " + "-" * (len(header) - 2))
        for i, length in enumerate(context["lengths"]):
            print(f"  {length:>8} {context['tokens_per_s'][i]:>15.0f}"
                  + "".join(f" {curve['kl'][i]:>14.4g}" for curve in context["curves"].values()))
    from modeldoctor.checkup.diagnosis import diagnose

    print("\nDiagnosis:")
    for finding in diagnose(report):
        print(f"  [{finding.severity}] {finding.title}. {finding.text}")
        if finding.recommendation:
            print(f"      → {finding.recommendation}")


def _flips(metrics: dict) -> str:
    """The flips column: the share of tokens routed to other experts (a mixture of experts)."""
    flips = metrics.get("routing_flip_rate")
    return f"{flips:>6.1%}" if flips is not None else f"{'-':>6}"


def _print_expert_usage(report) -> None:
    from modeldoctor.checkup.experts import expert_usage

    usage = expert_usage(report)
    if usage:
        print("\nExpert usage on the evaluation text (share of tokens per expert; 0 = never used):")
        for block, shares in usage.items():
            print(f"  block {block}: " + " ".join(f"e{i} {share:.0%}" for i, share in enumerate(shares)))


def parse_size_budget(text: str | None, fp32_bytes: int) -> int | None:
    """'30%' of the fp32 weights, or '150MB' / '150MiB' / '0.2GB'; None when not given."""
    if not text:
        return None
    value = text.strip().lower().replace(" ", "")
    units = {"%": None, "gib": 2**30, "gb": 10**9, "mib": 2**20, "mb": 10**6}
    for unit, size in units.items():
        if value.endswith(unit):
            try:
                number = float(value[: -len(unit)])
            except ValueError:
                break
            if number <= 0:
                break
            return int(fp32_bytes * number / 100) if size is None else int(number * size)
    raise ModelDoctorError(f"Cannot read the size budget '{text}'; give a share of fp32 such as 30% or a size "
                           "such as 150MB.")


def fast_export_checkup(session, precision: str, data_spec, quiet: bool = False, all_blocks: bool = False):
    """The two-stage linear checkup of the formats a precision writes (with `all_blocks`, its
    larger block sizes too), on the selection text: first-stage estimates of every linear, exact
    probes of the worst. Returns its report."""
    from modeldoctor.checkup.plan import CheckupPlan
    from modeldoctor.checkup.run import run_checkup
    from modeldoctor.data import DataSpec
    from modeldoctor.events import Failed, Finished
    from modeldoctor.export import PRECISION_FORMATS
    from modeldoctor.export.pipeline import BASE_FORMATS, PREDICTORS

    formats = PRECISION_FORMATS[precision] if all_blocks else BASE_FORMATS[precision]
    plan = CheckupPlan(modifications=[PREDICTORS[f] for f in formats], scope="linears", knowledge=False,
                       attention=False)
    data = session.data(DataSpec(**{**data_spec.__dict__, "split": "eval"})).selection_view()
    data.require_selection("Choosing the export's formats")
    if not quiet:
        print(f"No --from-checkup: estimating {', '.join(plan.modifications)} for every linear on the selection text "
              f"({data.eval_tokens} tokens) and measuring the worst …", file=sys.stderr)
    final = None
    for event in run_checkup(session, plan, data):
        if isinstance(event, Failed):
            raise ModelDoctorError(event.message)
        if isinstance(event, Finished):
            final = event
    if final is None or final.reason != "completed":
        raise ModelDoctorError("The checkup that chooses the export's formats did not complete.")
    return final.report


def cmd_export(args) -> int:
    from modeldoctor.data import DataSpec
    from modeldoctor.report import CheckupReport

    report = CheckupReport.load(args.from_checkup) if args.from_checkup else None
    out = Path(args.out).expanduser()
    if out.exists() and not args.force:
        raise ModelDoctorError(f"{out} already exists; pass --force to replace it.")
    session = _open_session(args)
    from modeldoctor.export.onnx_export import export_refusal

    refusal = export_refusal(session.model, session.anatomy.kind)
    if refusal:  # before the export's own checkup, which would be wasted
        raise ModelDoctorError(refusal)
    size_budget = parse_size_budget(args.size_budget, int(session.summary.parameters * 4))
    keep = [k.strip() for k in args.keep.split(",") if k.strip()] if args.keep is not None else None
    spec = DataSpec(tokens=args.tokens, seq_len=min(256, args.tokens), knowledge=False)
    if report is None and keep is None and args.precision != "fp32" and not args.no_checkup:
        report = fast_export_checkup(session, args.precision, spec, all_blocks=args.all_blocks)
    elif args.all_blocks:
        print("--all-blocks chooses what the export's own checkup measures; with --from-checkup, --keep or "
              "--no-checkup there is none, so it changes nothing.", file=sys.stderr)
    data = session.data(spec)
    return _run_export(session, data, out, args.precision, report, keep, args.budget, args.force, size_budget)


def _run_export(session, data, out: Path, precision: str, report, keep, budget: float, force: bool,
                size_budget: int | None = None) -> int:
    from modeldoctor.events import Failed, Finished, LogMessage, Stage
    from modeldoctor.export.pipeline import export_model

    began = time.monotonic()
    final = None
    for event in export_model(session, data, out, precision, report, keep, budget, force, size_budget=size_budget):
        if isinstance(event, Stage):
            print(f"[{time.monotonic() - began:5.0f} s] {event.name}: {event.detail}", file=sys.stderr)
        elif isinstance(event, LogMessage):
            print(event.message, file=sys.stderr)
        elif isinstance(event, Failed):
            print(f"modeldoctor: error: {event.message}", file=sys.stderr)
        elif isinstance(event, Finished):
            final = event
    result = final.report
    if result is not None:
        print_validation(result)
    if final.reason != "completed":
        return EXIT_USER_ERROR if final.reason == "failed" else EXIT_CANCELLED
    print(f"\nExported {precision} model to {result.path} (validated, {final.message}).")
    return 0


def cmd_treatments(args) -> int:
    from modeldoctor.treatment.base import treatments

    for treatment in treatments():
        print(f"{treatment.name:<24} {treatment.title}: {treatment.summary}")
    return 0


def cmd_treat(args) -> int:
    from modeldoctor.control import RunControl
    from modeldoctor.data import DataSpec
    from modeldoctor.events import Failed, Finished, Progress, Stage, TreatmentResult
    from modeldoctor.report import CheckupReport
    from modeldoctor.treatment.base import TreatmentPlan
    from modeldoctor.treatment.run import run_treatments

    names = [n.strip() for n in args.treatments.split(",") if n.strip()] if args.treatments else []
    target, sparsity = args.target, args.sparsity
    if not names:
        if not args.from_checkup:
            raise ModelDoctorError("Name the treatments (--treatments, see 'modeldoctor treatments') or give "
                                   "--from-checkup DIR to take the diagnosis's recommendations.")
        from modeldoctor.treatment.recommend import recommend

        advice = recommend(CheckupReport.load(args.from_checkup))
        if not advice:
            print("The checkup found nothing that a treatment addresses.")
            return 0
        first = next((a for a in advice if a.target == args.target), advice[0])
        names, target = list(first.treatments), first.target
        sparsity = first.sparsity or sparsity
        for item in advice:
            print(("→ " if item is first else "  ") + item.reason, file=sys.stderr)
    plan = TreatmentPlan(names, target=target, budget=args.budget, sparsity=sparsity,
                         pattern=args.pattern, decoding=args.decoding, threshold=args.threshold)
    plan.validate()
    if args.export and Path(args.export).expanduser().exists() and not args.force:
        raise ModelDoctorError(f"{Path(args.export).expanduser()} already exists; pass --force to replace it.")
    session = _open_session(args)
    source = args.data if args.data in ("builtin", "self") else str(Path(args.data).expanduser())
    spec = DataSpec(source=source, tokens=args.tokens, seq_len=min(256, args.tokens),
                    calibration_tokens=args.calibration_tokens, selection_tokens=args.selection_tokens,
                    seed=args.seed)
    data = session.data(spec)
    control = RunControl()
    bar = _ProgressBar(1, args.quiet, unit="pass")
    final = None
    events = run_treatments(session, plan, data, control)
    try:
        for event in events:
            if isinstance(event, Stage):
                bar.describe(event.name)
                bar.write(f"{event.name}: {event.detail}")
            elif isinstance(event, Progress):
                bar.set_total(event.total)
                bar.update(event.done, event.eta_s, event.eta_range)
            elif isinstance(event, TreatmentResult):
                bar.write(f"  {event.outcome.verdict}")
            elif isinstance(event, Failed):
                bar.close()
                if event.details:
                    _log_details(event.details)
                raise ModelDoctorError(event.message)
            elif isinstance(event, Finished):
                final = event
    except KeyboardInterrupt:
        control.cancel()
        events.close()  # rolls the treatments of this run back
        bar.close()
        print("Cancelled; the model was put back as it was.", file=sys.stderr)
        return EXIT_CANCELLED
    bar.close()
    if final.reason == "cancelled":
        print("Cancelled; the model was put back as it was.", file=sys.stderr)
        return EXIT_CANCELLED
    report = final.report
    print_treatments(report)
    path = report.save(Path(args.out).expanduser())
    print(f"\nSaved {path} ({report.elapsed_s:.0f} s).")
    if args.save_model:
        from modeldoctor.treatment.save import save_treated_model

        print(f"Saved the treated model to {save_treated_model(session, args.save_model, args.force)}.")
    if args.export:
        export_data = session.data(DataSpec(source=source, tokens=args.tokens, seq_len=min(256, args.tokens),
                                            calibration_tokens=args.calibration_tokens, knowledge=False,
                                            seed=args.seed))
        checkup = CheckupReport.load(args.from_checkup) if args.from_checkup else None
        return _run_export(session, export_data, Path(args.export).expanduser(), args.precision, checkup, None,
                           args.export_budget, args.force)
    return 0


def print_treatments(report) -> None:
    from modeldoctor.treatment.base import FIGURES

    for outcome in report.outcomes:
        print(f"\n{outcome.title} — {'applied' if outcome.applied else 'not applied'} ({outcome.seconds:.0f} s)")
        print(f"  measured on: {outcome.deployment}, held-out text")
        for key, (label, fmt) in FIGURES.items():
            if key in outcome.before and key in outcome.after:
                print(f"  {label:<18} {fmt.format(outcome.before[key]):>10} → {fmt.format(outcome.after[key]):>10}")
        if outcome.name == "prune-grad":
            for row in outcome.table:
                print(f"    {row['method']:<16} mean KL {row['kl_mean']:.4f}  top-1 {row['same_top']:.1%}  "
                      f"perplexity {row['ppl']:.3f}")
        print(f"  {outcome.verdict}")
    print(f"\nTreated model: {'; '.join(a['summary'] for a in report.state.get('applied', [])) or 'untreated'}")


def print_validation(result) -> None:
    from modeldoctor.export.pipeline import format_counts

    v, fp32 = result.validation, result.fp32
    rows = [("mean KL (budget)", f"{v['kl_mean']:.4f} ({result.budget_kl:g})"),
            ("KL median / p99 / max", f"{v['kl_median']:.4f} / {v['kl_p99']:.3f} / {v['kl_max']:.3f}"),
            ("top-1 agreement", f"{v['same_top']:.1%}"),
            ("perplexity (torch)", f"{v['ppl']:.3f} ({v['ppl_ref']:.3f})"),
            ("greedy 32 tokens identical", f"{v['greedy_identical']:.0%} of prompts, first divergence "
                                           f"{v['greedy_first_divergence']:.1f}"),
            ("size on disk", f"{v['size_bytes'] / 2**20:,.0f} MiB ({v['size_bytes'] / fp32['size_bytes']:.0%} of fp32)"),
            ("latency, 128-token prefill", f"{v['latency_s'] * 1000:.0f} ms (×{v.get('latency_ratio', 1):.2f} fp32 ONNX)"),
            ("decode, 1 token after 256", f"{v['decode_s'] * 1000:.1f} ms (×{v.get('decode_ratio', 1):.2f} fp32 ONNX)"
             if "decode_s" in v else "—"),
            ("formats", ", ".join(f"{n} {f}" for f, n in format_counts(result.formats).items())),
            ("predicted", (f"mean KL {result.predicted_kl:.4f} ({result.predicted_by}), "
                           if result.predicted_kl is not None else "no KL (no checkup of this format), ")
             + (f"{result.predicted_bytes / 2**20:,.0f} MiB" if result.predicted_bytes else "")),
            ("simulated", f"mean KL {result.simulated_kl:.4f} (every linear in its format at once, before writing)"
             if result.simulated_kl is not None else "—"),
            ("verdict", "passed" if result.passed else "FAILED: over budget")]
    if len(result.rounds) > 1:
        rows[-1:-1] = [(f"round {i}", f"predicted {r['predicted_kl']:.4f}, simulated {r['simulated_kl']:.4f}, "
                                      f"measured {r['kl_mean']:.4f}, "
                                      f"{r['size_bytes'] / 2**20:,.0f} MiB")
                       for i, r in enumerate(result.rounds, 1) if r["predicted_kl"] is not None]
    width = max(len(k) for k, _ in rows)
    print()
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


def _log_details(details: str) -> Path | None:
    try:
        import platformdirs

        folder = Path(platformdirs.user_log_dir("modeldoctor"))
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "modeldoctor.log"
        with open(path, "a", encoding="utf-8") as log:
            log.write(details + "\n")
        return path
    except OSError:
        return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modeldoctor", description=(
        "Find where a language model bleeds under deployment modifications. "
        "MODEL is a Hugging Face folder, a .gguf file, or 'sample' for SmolLM2-135M-Instruct."))
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def model_args(p):
        p.add_argument("model", metavar="MODEL", help="model folder, .gguf file, or 'sample'")
        p.add_argument("--allow-pickle", action="store_true",
                       help="also open pickle checkpoints (.bin/.pt), with weights_only=True")

    p = sub.add_parser("app", help="open the desktop app (the default with no command)")
    p.add_argument("model", nargs="?", metavar="MODEL", help="model to open at start, or 'sample'")
    p.set_defaults(func=cmd_app)
    p = sub.add_parser("info", help="print the model summary")
    model_args(p)
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("sample", help="fetch and convert the sample model; print its folder")
    p.set_defaults(func=cmd_sample)
    p = sub.add_parser("export", help="export a validated ONNX model, one format per linear chosen from a checkup")
    model_args(p)
    p.add_argument("--precision", choices=PRECISION_CHOICES, default="int8",
                   help="int8 / int4: MatMulNBits blocks of 32, and of 64 or 128 where a checkup measured them (int4 "
                        "mixes in 8 bits where it pays; the head and a tied embedding at 8 bits unless the checkup "
                        "clears 4); int8-dynamic: W8A8 MatMulInteger; fp32")
    p.add_argument("--all-blocks", action="store_true",
                   help="also check up and consider blocks of 64 and 128 (int8-b64, int8-b128, int4-b128): smaller "
                        "files where they are safe, for a checkup of more formats")
    p.add_argument("--from-checkup", metavar="DIR",
                   help="checkup folder (or checkup.json) whose figures choose the formats; without it a fast "
                        "two-stage checkup on the selection text runs first")
    p.add_argument("--no-checkup", action="store_true", help="no checkup: every linear in the precision's format")
    p.add_argument("--keep", metavar="LINEARS", help="comma-separated linears to keep in fp32 (overrides the checkup)")
    p.add_argument("--budget", type=float, default=0.02, help="largest mean KL accepted (default 0.02)")
    p.add_argument("--size-budget", metavar="SIZE",
                   help="largest file, as a share of fp32 (30%%) or a size (150MB): the formats then minimise the "
                        "predicted KL within it")
    p.add_argument("--tokens", type=int, default=1024, help="evaluation tokens for validation")
    p.add_argument("--out", required=True, help="folder to create")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("treat", help="treat the bleeding: scaling, gradient-aware pruning, mixed precision, "
                                     "temperature calibration, recovery prompts; each measured before/after")
    model_args(p)
    p.add_argument("--treatments", help="comma-separated, applied in order (see 'modeldoctor treatments'); "
                                        "default: what --from-checkup recommends")
    p.add_argument("--from-checkup", metavar="DIR", help="checkup folder whose diagnosis picks the treatments")
    p.add_argument("--target", default="int8-dynamic",
                   help="the deployment modification to treat: int8-dynamic, int8-b32, int4-b32 (what the "
                        "int8-dynamic, int8 and int4 exports write), int4-g32-asym, … or none")
    p.add_argument("--budget", type=float, default=0.10, help="mixed precision: fraction of weights in fp32")
    p.add_argument("--sparsity", type=float, default=0.5, help="gradient-aware pruning sparsity (0.5 = 50 %%)")
    p.add_argument("--pattern", choices=("unstructured", "2of4"), default="unstructured")
    p.add_argument("--decoding", default="decode-sample", help="your decoding settings, e.g. decode-temp-0.7")
    p.add_argument("--threshold", type=float, default=0.01, help="bleeding threshold, mean KL in nats")
    p.add_argument("--data", default="builtin", help="builtin, self, or a .txt/.jsonl file")
    p.add_argument("--tokens", type=int, default=1024, help="evaluation tokens (held out from fits and choices)")
    p.add_argument("--calibration-tokens", type=int, default=512, help="tokens the treatments fit on")
    p.add_argument("--selection-tokens", type=int, default=512,
                   help="tokens the choices are made on (roll-back, keep list, method, temperature)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="treatment-results", help="folder for treatment.json")
    p.add_argument("--save-model", metavar="DIR", help="also save the treated model as a safetensors folder")
    p.add_argument("--export", metavar="DIR", help="then export the treated model to ONNX here")
    p.add_argument("--precision", choices=PRECISION_CHOICES, default="int8", help="with --export")
    p.add_argument("--export-budget", type=float, default=0.02, help="with --export: largest mean KL accepted")
    p.add_argument("--force", action="store_true", help="replace --save-model / --export folders if they exist")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_treat)
    p = sub.add_parser("treatments", help="list the treatments")
    p.set_defaults(func=cmd_treatments)
    p = sub.add_parser("modifications", help="list the modifications a checkup can apply")
    p.set_defaults(func=cmd_modifications)
    p = sub.add_parser("checkup", help="probe the model layer by layer and rank the bleeding layers")
    model_args(p)
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="what the model runs in (auto: float32 on the CPU, bfloat16 on a GPU); log-softmax and KL "
                        "are computed in float32 either way")
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto",
                   help="where the model runs (auto: a GPU if PyTorch sees one, else the CPU)")
    p.add_argument("--modify", default="int8-dynamic,int4,prune-wanda-50,remove",
                   help="comma-separated modifications (see 'modeldoctor modifications')")
    p.add_argument("--scope", choices=("blocks", "linears", "experts"), default="blocks",
                   help="experts: each router, expert and shared expert of a mixture of experts")
    p.add_argument("--mode", default="isolated", help="comma-separated: isolated, cumulative, sweep")
    p.add_argument("--data", default="builtin", help="builtin, self (sampled from the model), or a .txt/.jsonl file")
    p.add_argument("--tokens", type=int, default=1024, help="evaluation tokens (default 1024)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--calibration-tokens", type=int, default=512, help="tokens that Wanda / gradients fit on")
    p.add_argument("--selection-tokens", type=int, default=512, help="tokens kept apart for choices")
    p.add_argument("--split", choices=("evaluation", "selection"), default="evaluation",
                   help="which text the figures are on: 'selection' for a checkup whose figures choose what an "
                        "export keeps in fp32, so the export's validation stays held out")
    p.add_argument("--threshold", type=float, default=0.01, help="bleeding threshold, mean KL in nats")
    p.add_argument("--targets", help="only these blocks or linears, comma-separated (e.g. 0,1 or 3.mlp.down_proj)")
    p.add_argument("--no-knowledge", action="store_true", help="skip the knowledge probes")
    p.add_argument("--no-prefix-cache", action="store_true", help="rerun every block for every probe")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--top", type=int, default=15, help="rows in the ranked table")
    p.add_argument("--exhaustive", action="store_true",
                   help="measure every probe exactly (default: estimate the isolated quantization probes all at "
                        "once, then measure the top of each and a random control exactly, then any estimate that could still "
                        "reach the top or the threshold given how far the measured ones ran above their estimates)")
    p.add_argument("--verify-top", type=int, default=10,
                   help="two stages: at least this many highest estimates per modification are measured exactly")
    p.add_argument("--knowledge-on", choices=("worst", "bleeding", "all"), default="worst",
                   help="score the knowledge probes after the probes on each modification's "
                        f"{KNOWLEDGE_TOP} worst bleeding probes (default), on every bleeding probe as "
                        "it is measured, or on every probe")
    p.add_argument("--context-lengths", metavar="TOKENS",
                   help="also run the long-context probe: each modification on the whole model at these lengths "
                        "of the evaluation text, comma-separated (e.g. 256,1024,4096), or 'auto' for 128 … 8192 "
                        "as far as the text reaches; with --tokens at least the longest")
    p.add_argument("--resume", metavar="DIR",
                   help="continue a cancelled or interrupted checkup saved in DIR (its plan and text; done probes "
                        "are kept)")
    p.add_argument("--out", help="folder for checkup.json and checkup.csv, saved as the run goes "
                                 "(default: checkup-results, or the --resume folder)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_checkup)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        args = parser.parse_args(["app"])
    try:
        return args.func(args)
    except ModelDoctorError as exc:
        print(f"modeldoctor: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("Cancelled.", file=sys.stderr)
        return EXIT_CANCELLED
    except MemoryError:
        print("modeldoctor: error: out of memory; try fewer --tokens or a smaller model.", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as exc:  # a bug: one line for the user, the traceback in the log
        path = _log_details(traceback.format_exc())
        print(f"modeldoctor: internal error: {exc}" + (f" (details in {path})" if path else ""), file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
