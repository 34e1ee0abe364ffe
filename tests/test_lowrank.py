import torch

from modeldoctor.checkup.diagnosis import diagnose
from modeldoctor.checkup.plan import CheckupPlan
from modeldoctor.checkup.run import checkup
from modeldoctor.modifications.lowrank import kept_rank, low_rank, stored_fraction


def test_low_rank_keeps_exactly_the_rank_asked_and_the_full_rank_is_the_weight():
    torch.manual_seed(0)
    weight = torch.randn(24, 40)
    assert torch.linalg.matrix_rank(low_rank(weight, 5)) == 5
    torch.testing.assert_close(low_rank(weight, 24), weight, rtol=1e-5, atol=1e-5)
    assert kept_rank((24, 40), 50.0, None) == 12 and kept_rank((24, 40), 1.0, None) == 1
    assert kept_rank((24, 40), None, 100) == 24
    assert stored_fraction((24, 40), 12) == 12 * 64 / (24 * 40)


def test_activation_aware_svd_loses_less_on_inputs_with_loud_features():
    """Where a few input features are much larger than the rest (as in LLM activations), the
    factors chosen on W·diag(‖x‖) give a smaller output error than plain SVD at the same rank."""
    torch.manual_seed(0)
    weight = torch.randn(32, 48)
    loudness = torch.ones(48)
    loudness[:4] = 30.0
    inputs = torch.randn(2000, 48) * loudness
    norms = inputs.norm(dim=0)
    plain = ((inputs @ (weight - low_rank(weight, 8)).T) ** 2).sum()
    aware = ((inputs @ (weight - low_rank(weight, 8, norms)).T) ** 2).sum()
    assert aware < 0.5 * plain


def test_a_rank_sweep_finds_where_the_model_breaks(llama_session, small_data_spec):
    plan = CheckupPlan(modifications=["rank-sweep"], modes=("sweep",), knowledge=False)
    report = checkup(llama_session, plan, llama_session.data(small_data_spec))
    curve = report.findings["sweeps"]["svd"]
    assert curve["strengths"] == [90.0, 75.0, 50.0, 25.0, 10.0]  # gentlest first: a lower rank is harsher
    scores = curve["scores"]
    assert scores[-1] > scores[0] > 0
    text = " ".join(f.title + " " + f.text for f in diagnose(report))
    assert "Robustness threshold (svd)" in text and "% of the rank" in text
