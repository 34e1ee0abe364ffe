"""The plot buffers, without Qt."""

import numpy as np

from modeldoctor.checkup.verdict import judge
from modeldoctor.gui.viewmodel import SEVERITY_COLORS, CheckupViewModel
from modeldoctor.report.results import ProbeRecord, ProbeSpec


def rec(index, mod, target, kl, mode="isolated", step=None, strength=None, family="quantize"):
    spec = ProbeSpec(index, mod, family, mode, (target,), 0, step, strength)
    bleeding, severity, reason = judge({"kl_mean": kl}, family, 0.01)
    return ProbeRecord(spec, {"kl_mean": kl}, bleeding, severity, reason)


def test_bars_follow_selected_modification_and_verdict():
    vm = CheckupViewModel(0.01)
    for i, kl in enumerate([0.001, 0.2, 0.02]):
        vm.add(rec(i, "int4", str(i), kl))
    vm.add(rec(3, "remove", "0", 2.0, family="structure"))
    bars = vm.bars()
    assert vm.selected == "int4" and bars.labels == ["0", "1", "2"]
    assert bars.colors() == [SEVERITY_COLORS["healthy"], SEVERITY_COLORS["moderate"], SEVERITY_COLORS["mild"]]
    assert bars.worst() == [1, 2]
    vm.select("remove")
    assert vm.bars().values == [2.0]


def test_heatmap_layers_by_modifications_and_linear_scope():
    vm = CheckupViewModel()
    vm.add(rec(0, "int4", "0", 0.1))
    vm.add(rec(1, "int4", "1", 0.01))
    vm.add(rec(2, "int8", "0", 0.001))
    cells = vm.heatmap()
    matrix, rows, cols = cells.kl, cells.rows, cells.cols
    assert rows == ["0", "1"] and cols == ["int4", "int8"]
    assert np.isclose(matrix[0, 0], -1) and np.isnan(matrix[1, 1])
    # Not measured: transparent (drawn hatched), never a verdict colour.
    assert cells.colors[1, 1, 3] == 0 and cells.colors[0, 0, 3] == 255
    linear = CheckupViewModel()
    linear.add(rec(0, "int4", "0.mlp.down_proj", 0.1))
    linear.add(rec(1, "int4", "1.self_attn.q_proj", 0.01))
    cells = linear.heatmap()
    rows, cols = cells.rows, cells.cols
    assert rows == ["0", "1"] and cols == ["mlp.down_proj", "self_attn.q_proj"]


def test_cumulative_crossing_and_version_bumps():
    vm = CheckupViewModel(0.01)
    version = vm.version
    for k, kl in enumerate([0.001, 0.005, 0.02, 0.1], 1):
        vm.add(rec(k, "int4", str(k - 1), kl, mode="cumulative", step=k))
    assert vm.version == version + 4
    x, y, crossing = vm.cumulative()["int4"]
    assert list(x) == [1, 2, 3, 4] and crossing == 3


def test_before_after_bars_share_one_axis_and_colour_the_after_bars():
    from types import SimpleNamespace

    from modeldoctor.gui.viewmodel import SEVERITY_COLORS, BeforeAfter

    outcome = SimpleNamespace(layers={"targets": ["0", "1", "2"], "before": [0.2, 0.02, 0.001],
                                      "after": [0.05, 0.005, 0.001]})
    bars = BeforeAfter.from_outcome(outcome, threshold=0.01)
    assert bars.labels == ["0", "1", "2"]
    before, after = bars.heights(bars.before), bars.heights(bars.after)
    assert before[0] > after[0] and before[1] > after[1] and before[2] == after[2]
    assert bars.after_colors() == [SEVERITY_COLORS["moderate"], SEVERITY_COLORS["healthy"], SEVERITY_COLORS["healthy"]]
    assert bars.worst_after() == [0]
    assert BeforeAfter.from_outcome(SimpleNamespace(layers={}), 0.01).labels == []
