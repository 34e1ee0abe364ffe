import json

import pytest

from modeldoctor.cli import main


def test_info(llama_dir, capsys):
    assert main(["info", str(llama_dir)]) == 0
    out = capsys.readouterr().out
    assert "LlamaForCausalLM" in out and "Blocks" in out


def test_checkup_writes_json_and_csv(llama_dir, tmp_path, capsys):
    code = main(["checkup", str(llama_dir), "--modify", "int8-dynamic,int2,remove", "--tokens", "128",
                 "--seq-len", "64", "--out", str(tmp_path / "res"), "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    data = json.loads((tmp_path / "res" / "checkup.json").read_text())
    assert data["status"] == "completed" and len(data["probes"]) == 9
    assert (tmp_path / "res" / "checkup.csv").exists()
    assert "isolated probes bleed" in captured.out and "int2 @ 0" in captured.out


@pytest.mark.parametrize("args, message", [
    (["info", "/no/such/model"], "does not exist"),
    (["checkup", "MODEL", "--modify", "int9"], "Unknown modification"),
    (["checkup", "MODEL", "--scope", "blocks", "--mode", "sideways"], "Scan modes"),
    (["checkup", "MODEL", "--data", "/no/such/file.txt"], "No text file"),
    (["checkup", "MODEL", "--tokens", "4"], "at least 32 tokens"),
])
def test_bad_input_is_one_clear_line(llama_dir, capsys, args, message):
    args = [str(llama_dir) if a == "MODEL" else a for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("modeldoctor: error:")


def test_non_utf8_and_empty_text(llama_dir, tmp_path, capsys):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 au lait".encode("latin-1"))
    assert main(["checkup", str(llama_dir), "--data", str(bad)]) == 2
    assert "not UTF-8" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n ")
    assert main(["checkup", str(llama_dir), "--data", str(empty)]) == 2
    assert "contains no text" in capsys.readouterr().err


def test_modifications_listing(capsys):
    assert main(["modifications"]) == 0
    out = capsys.readouterr().out
    assert "int8-dynamic" in out and "prune-wanda-50" in out and "bits-sweep" in out


def test_ctrl_c_keeps_the_measured_probes_and_resume_finishes(llama_dir, tmp_path, capsys, monkeypatch):
    """The first Ctrl+C stops at the next checkpoint: the report is saved as cancelled with what
    was measured, and --resume continues from it without measuring those probes again."""
    import signal

    from modeldoctor.checkup import run as checkup_run

    original = checkup_run.measure
    calls, interrupted = [], []

    def measure_then_interrupt(*args, **kwargs):
        calls.append(args[4].label)
        record = original(*args, **kwargs)
        if len(calls) == 2 and not interrupted:
            interrupted.append(True)
            signal.raise_signal(signal.SIGINT)  # what Ctrl+C sends
        return record

    monkeypatch.setattr(checkup_run, "measure", measure_then_interrupt)
    out = tmp_path / "res"
    args = ["checkup", str(llama_dir), "--modify", "int4,remove", "--tokens", "128", "--seq-len", "64",
            "--out", str(out), "--exhaustive"]
    assert main(args) == 130
    err = capsys.readouterr().err
    assert "Cancelling after the current step" in err and f"--resume {out}" in err
    saved = json.loads((out / "checkup.json").read_text())
    assert saved["status"] == "cancelled" and len(saved["probes"]) == 2
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back

    calls.clear()
    assert main(["checkup", str(llama_dir), "--resume", str(out), "--quiet"]) == 0
    assert len(calls) == 4  # the other four probes only
    resumed = json.loads((out / "checkup.json").read_text())
    assert resumed["status"] == "completed" and len(resumed["probes"]) == 6


def test_progress_bar_shows_the_engines_eta(capsys):
    from modeldoctor.cli import _ProgressBar

    bar = _ProgressBar(10, quiet=False)
    bar.update(4, 75.0)
    bar.close()
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "4/10" in line and "1:15 left" in line and "<," not in line


def test_checkup_runs_in_bfloat16_with_float32_figures(llama_dir, tmp_path, capsys):
    code = main(["checkup", str(llama_dir), "--modify", "int2,remove", "--tokens", "128", "--seq-len", "64",
                 "--dtype", "bfloat16", "--device", "cpu", "--out", str(tmp_path / "res"), "--quiet"])
    assert code == 0, capsys.readouterr().err
    data = json.loads((tmp_path / "res" / "checkup.json").read_text())
    assert data["model"]["compute_dtype"] == "bfloat16"
    assert all(p["metrics"]["kl_mean"] > 0 for p in data["probes"])


def test_a_missing_device_is_one_clear_line(llama_dir, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["checkup", str(llama_dir), "--device", "cuda", "--tokens", "128", "--seq-len", "64"]) == 2
    err = capsys.readouterr().err
    assert "no cuda device" in err and "Traceback" not in err


def test_size_budgets_read_as_a_share_or_a_size():
    from modeldoctor.cli import parse_size_budget
    from modeldoctor.errors import ModelDoctorError

    assert parse_size_budget("30%", 1000) == 300
    assert parse_size_budget("150MB", 1) == 150_000_000 and parse_size_budget("1.5 GiB", 1) == int(1.5 * 2**30)
    assert parse_size_budget(None, 1000) is None
    for bad in ("thirty", "-5%", "12", "0MB"):
        with pytest.raises(ModelDoctorError, match="size budget"):
            parse_size_budget(bad, 1000)


def test_export_without_a_checkup_estimates_and_fits_the_size_budget(llama_dir, tmp_path, capsys):
    """No --from-checkup: the CLI runs the two-stage checkup of what int4 writes (int4-b32 and
    int8-b32) on the selection text, then picks the formats within the size budget."""
    from modeldoctor.session import Session

    out = tmp_path / "onnx"
    # A tiny model's graph is 70 % of its weights' fp32 bytes; 120 % leaves the weights about half of theirs.
    code = main(["export", str(llama_dir), "--precision", "int4", "--size-budget", "120%", "--budget", "5",
                 "--tokens", "64", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "estimating int4-b32, int8-b32" in captured.err and "selection text" in captured.err
    assert "within" in captured.err and "graph takes" in captured.err  # which constraint it met, and how
    card = json.loads((out / "modeldoctor.json").read_text())
    fp32_bytes = Session.open(llama_dir).summary.parameters * 4
    predicted, written = card["rounds"][-1]["predicted_bytes"], card["validation"]["size_bytes"]
    assert predicted <= 1.2 * fp32_bytes and written == pytest.approx(predicted, rel=0.05)
    assert not any("cannot be met" in note for note in card["notes"])
    assert set(card["formats"].values()) <= {"int4", "int8", "fp32"} and card["predicted_kl"] is not None
    assert "formats" in captured.out and "predicted" in captured.out
    # --no-checkup: every block linear in the precision's format, the head at 8 bits.
    code = main(["export", str(llama_dir), "--precision", "int4", "--no-checkup", "--budget", "5", "--tokens", "64",
                 "--out", str(out), "--force"])
    assert code == 0
    formats = json.loads((out / "modeldoctor.json").read_text())["formats"]
    assert formats.pop("head") == "int8" and set(formats.values()) == {"int4"}


def test_export_all_blocks_checks_up_and_mixes_the_larger_blocks(llama_dir, tmp_path, capsys):
    out = tmp_path / "onnx"
    code = main(["export", str(llama_dir), "--precision", "int8", "--all-blocks", "--budget", "5", "--tokens", "64",
                 "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "estimating int8-b32, int8-b64, int8-b128" in captured.err
    card = json.loads((out / "modeldoctor.json").read_text())
    # A loose KL budget: the smallest file, every linear in its smallest format as written: the
    # 64-wide down projections in blocks of 64, the 32-wide linears in blocks of 32 (a block of 128
    # would pad their rows to 4×).
    assert {f for n, f in card["formats"].items() if n.endswith("down_proj")} == {"int8-b64"}
    assert {f for n, f in card["formats"].items() if not n.endswith("down_proj")} == {"int8"}
    assert "int8-b128" in card["predicted_by"]
