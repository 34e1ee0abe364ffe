"""Time estimates: before a run from probe costs by position and kind, during a run from measured
probes on a clock that stops while paused (issue 12: the ETA was 2x optimistic and counted pauses)."""

import threading
import time

from modeldoctor.checkup.plan import CheckupPlan, build_probes
from modeldoctor.checkup.run import fewest_exact_probes
from modeldoctor.checkup.timing import ProbeClock, planned_duration, probe_cost
from modeldoctor.control import RunControl
from modeldoctor.report.results import ProbeSpec


def test_the_control_clock_stops_while_paused():
    control = RunControl()
    began = control.clock()
    control.pause()
    time.sleep(0.3)
    assert control.clock() - began < 0.1
    control.resume()
    time.sleep(0.1)
    assert 0.08 < control.clock() - began < 0.25
    control.pause()
    control.pause()  # twice is once
    timer = threading.Timer(0.2, control.resume)
    timer.start()
    control.checkpoint()  # blocks until resumed
    assert control.clock() - began < 0.3


def _duration(session, plan, tokens=1024):
    probes, _ = build_probes(plan, session.anatomy)
    return planned_duration(session.anatomy, plan, probes, 1e-3, tokens, 2000, fewest_exact_probes(plan, probes))


def test_planned_duration_follows_position_kind_and_size(llama_session):
    anatomy = llama_session.anatomy
    late, early = (ProbeSpec(0, "remove", "structure", "isolated", (str(b),), b) for b in (2, 0))
    assert probe_cost(anatomy, late, True) < probe_cost(anatomy, early, True)
    assert probe_cost(anatomy, late, False) == probe_cost(anatomy, early, False)
    decoding = ProbeSpec(0, "decode-temp-0.7", "decoding", "isolated", ("model",), 0)
    assert probe_cost(anatomy, decoding, True) > 5 * probe_cost(anatomy, early, True)
    plan = CheckupPlan(modifications=["int4", "remove"], scope="linears")
    two_stage, exhaustive = _duration(llama_session, plan), _duration(llama_session, CheckupPlan(
        modifications=["int4", "remove"], scope="linears", exhaustive=True))
    assert two_stage.low < two_stage.high and exhaustive.low < exhaustive.high
    # Stage 1 costs about three passes per modification; it pays once few probes need verifying.
    few = _duration(llama_session, CheckupPlan(modifications=["int4", "remove"], scope="linears", verify_top=1,
                                               control_sample=0))
    assert few.low < exhaustive.low and few.low < two_stage.low
    assert _duration(llama_session, plan, 2048).low > 1.5 * two_stage.low
    without_knowledge = planned_duration(anatomy, CheckupPlan(modifications=["remove"], knowledge=False),
                                         build_probes(CheckupPlan(modifications=["remove"]), anatomy)[0],
                                         1e-3, 1024, 2000, 3)
    assert without_knowledge.low == without_knowledge.high  # nothing uncertain left


def test_live_eta_learns_per_kind_and_gives_a_range():
    clock = ProbeClock()
    quant = ProbeSpec(0, "int4", "quantize", "isolated", ("0",), 0)
    structure = ProbeSpec(1, "remove", "structure", "isolated", ("0",), 0)
    assert clock.remaining([(quant, 3.0)]) == (None, None)
    clock.observe(quant, 3.0, 3.0)  # 1 s per unit, and a slow one (knowledge scored): 2 s per unit
    clock.observe(quant, 2.0, 4.0)
    clock.observe(structure, 1.0, 0.1)
    expected, spread = clock.remaining([(quant, 2.0), (structure, 10.0)])
    assert abs(expected - (2.0 * 1.5 + 10.0 * 0.1)) < 1e-9
    assert abs(spread.low - (2.0 + 1.0)) < 1e-9 and abs(spread.high - (4.0 + 1.0)) < 1e-9
