"""On the real sample model (fetched once by packaging/test.sh into the user cache)."""

import pytest

from modeldoctor.model.sample import sample_dir, sample_ready

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not sample_ready(), reason="sample model not fetched: run 'modeldoctor sample'")]


@pytest.fixture(scope="module")
def smol():
    from modeldoctor.session import Session

    return Session.open(sample_dir())


def test_sample_model_card(smol):
    summary = smol.summary
    assert summary.family == "llama" and summary.blocks == 30 and summary.linears == 210
    assert 130e6 < summary.parameters < 140e6


def test_down_proj_bleeds_most_under_int8_dynamic(smol):
    """The measured fact the checkup must find: int8 dynamic hurts down_proj the most."""
    from modeldoctor.checkup.plan import CheckupPlan
    from modeldoctor.checkup.run import checkup
    from modeldoctor.data import DataSpec

    data = smol.data(DataSpec(tokens=256, seq_len=256, knowledge=False))
    before = smol.weights_digest()
    targets = [f"{b}.{rel}" for b in (0, 1) for rel in smol.anatomy.blocks[b].linears]
    report = checkup(smol, CheckupPlan(modifications=["int8-dynamic"], scope="linears", targets=targets,
                                       knowledge=False), data)
    assert smol.weights_digest() == before
    assert 10 < report.reference["ppl"] < 60
    ranked = report.ranked()
    assert ranked[0].spec.targets[0].endswith("mlp.down_proj")


def test_smoothing_treats_int8_dynamic_and_reset_is_bit_exact(smol):
    """SmoothQuant scales found on calibration text lower the held-out KL of int8 dynamic on
    SmolLM2 (0.58 → 0.38 on 1024 tokens in benchmarks/treatment.py) and keep the float model."""
    from modeldoctor.data import DataSpec
    from modeldoctor.treatment.base import TreatmentPlan
    from modeldoctor.treatment.run import treat

    data = smol.data(DataSpec(tokens=256, seq_len=256, calibration_tokens=256, knowledge=False))
    before = smol.weights_digest()
    try:
        outcome = treat(smol, TreatmentPlan(["smoothquant"], target="int8-dynamic"), data).outcomes[0]
        assert outcome.applied, outcome.verdict
        assert outcome.after["kl_mean"] < 0.85 * outcome.before["kl_mean"]
        assert outcome.details["float_model_kl_after_fold"] < 1e-4
        before_layers, after_layers = outcome.layers["before"], outcome.layers["after"]
        assert len(before_layers) == len(after_layers) == 30
        assert sum(after_layers) < sum(before_layers)
    finally:
        smol.reset_treatments()
    assert smol.weights_digest() == before
