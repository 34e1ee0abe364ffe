"""The Plan page's low-rank, KV-cache, RoPE and long-context choices, and the Diagnosis page's
context-length plots, as a user sees them."""

from tests.gui.conftest import load, run_checkup


def test_context_length_plots_after_a_checkup(qtbot, window, llama_dir, screenshots, tmp_path):
    from modeldoctor.gui.dialogs import ProbeDetailsDialog

    load(qtbot, window, llama_dir)
    window.data_page.slider.setValue(6)  # 768 tokens: past the tiny model's 512-token limit
    plan = window.plan_page
    plan.int8_dynamic.setChecked(False)
    plan.bits[4].setChecked(False)
    plan.prune_on.setChecked(False)
    plan.remove.setChecked(False)
    plan.svd_on.setChecked(True)
    plan.svd_percent.setValue(30)
    plan.svd_aware.setChecked(True)
    plan.kv_on.setChecked(True)
    plan.kv_format.setCurrentText("int2 per token")
    plan.kv_which.setCurrentText("keys only")
    plan.rope_on.setChecked(True)
    plan.rope_method.setCurrentText("YaRN")
    plan.rope_factor.setValue(4)
    plan.long_context.setChecked(True)
    assert plan.modifications() == ["svd-aw-r30", "k-int2", "rope-yarn-4"]
    plan.grab().save(str(screenshots / "tiny-plan-context.png"))
    run_checkup(qtbot, window, timeout=180000)
    report = window.state.report
    assert report.status == "completed"
    assert report.context["lengths"] == [128, 256, 512, 768]
    window.go(4)
    page = window.diagnosis_page
    names = [page.tabs.tabText(i) for i in range(page.tabs.count())]
    page.tabs.setCurrentIndex(names.index("Context length"))
    # one curve per modification of layer probes (RoPE scaling has none: it is one whole-model probe) ...
    assert sorted(page.by_position.curves) == ["k-int2 (mean of 3 probes)", "svd-aw-r30 (mean of 3 probes)"]
    # ... and one per modification on the whole model, a point per length
    assert sorted(page.by_length.curves) == ["k-int2", "rope-yarn-4", "svd-aw-r30"]
    x, _ = page.by_length.curves["rope-yarn-4"].getData()
    assert len(x) == 4
    assert "tokens/s" in page.length_note.text() and "limit is 512" in page.length_note.text()
    page.grab().save(str(screenshots / "tiny-diagnosis-context.png"))
    assert "Long-context probe" in page.text.toPlainText() and "rope-yarn-4 (whole model)" in page.text.toPlainText()
    html_path = tmp_path / "report.html"
    window.write_html(html_path)
    text = html_path.read_text(encoding="utf-8")
    assert "Long-context probe: whole model, mean KL by length" in text and "Mean KL by position" in text
    record = next(p for p in report.probes if p.spec.modification == "k-int2")
    dialog = ProbeDetailsDialog(record)
    qtbot.addWidget(dialog)
    tabs = [dialog.tabs.tabText(i) for i in range(dialog.tabs.count())]
    assert "By position" in tabs
    dialog.tabs.setCurrentIndex(tabs.index("By position"))
    dialog.show()
    dialog.grab().save(str(screenshots / "tiny-probe-by-position.png"))
    dialog.close()


def test_the_plan_pages_groups_do_not_overlap_on_a_mixture_of_experts(qtbot, window, moe_dirs):
    """Every group of choices the Plan page shows for this model has a place of its own."""
    from PySide6.QtWidgets import QGroupBox

    load(qtbot, window, moe_dirs["mixtral"])
    window.go(2)
    groups = [g for g in window.plan_page.findChildren(QGroupBox) if g.isVisible()]
    assert any(g.title().startswith("Mixture of experts") for g in groups)
    for i, first in enumerate(groups):
        for second in groups[i + 1:]:
            assert not first.geometry().intersects(second.geometry()), (first.title(), second.title())
