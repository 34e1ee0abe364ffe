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
