import json
import math
import shutil

import pytest
import torch

from modeldoctor.errors import ModelLoadError, UnsafeModelError, UnsupportedModelError
from modeldoctor.model import load_model
from modeldoctor.session import Session
from tiny_models import make_model


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _snapshot(folder):
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.iterdir())}


def _stored_tensors(folder):
    """(elements, bytes) of the tensors the checkpoint stores, read from its safetensors headers."""
    elements = stored = 0
    for path in folder.glob("*.safetensors"):
        raw = path.read_bytes()
        header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
        for name, entry in header.items():
            if name != "__metadata__":
                elements += math.prod(entry["shape"])
                stored += entry["data_offsets"][1] - entry["data_offsets"][0]
    return elements, stored


def test_loads_folder_and_summarises(model_dirs):
    session = Session.open(model_dirs["llama"])
    summary = session.summary
    assert summary.family == "llama" and summary.format == "safetensors"
    assert summary.blocks == 3 and summary.linears == 21
    assert "F32" in summary.stored_dtype
    # Parameters and memory are what the fp32 checkpoint holds, read from the file rather than the
    # loaded module (GPT-2 ties its head to the embedding: stored once, so counted once).
    for family in ("llama", "gpt2"):
        summary = Session.open(model_dirs[family]).summary
        assert (summary.parameters, summary.memory_bytes) == _stored_tensors(model_dirs[family]), family


def test_loading_never_writes_to_the_model_folder(llama_dir, small_data_spec):
    from modeldoctor.checkup.plan import CheckupPlan
    from modeldoctor.checkup.run import checkup

    before = _snapshot(llama_dir)
    session = Session.open(llama_dir)
    checkup(session, CheckupPlan(modifications=["int4"]), session.data(small_data_spec))
    assert _snapshot(llama_dir) == before


def test_truncated_safetensors_is_reported(llama_dir, tmp_path):
    folder = _copy(llama_dir, tmp_path / "m")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="truncated"):
        load_model(folder)


def test_garbage_safetensors_is_reported(llama_dir, tmp_path):
    folder = _copy(llama_dir, tmp_path / "m")
    (folder / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ModelLoadError, match="not a valid safetensors"):
        load_model(folder)


def test_pickle_checkpoint_refused_unless_opted_in(tmp_path):
    folder = tmp_path / "pickled"
    model = make_model("llama")
    model.save_pretrained(folder, safe_serialization=False)
    from tiny_models import byte_tokenizer

    byte_tokenizer().save_pretrained(folder)
    assert (folder / "pytorch_model.bin").exists()
    with pytest.raises(UnsafeModelError, match="pickle"):
        load_model(folder)
    loaded = load_model(folder, allow_pickle=True)
    assert loaded.format == "pickle"
    assert torch.equal(loaded.model.lm_head.weight, model.lm_head.weight)


def test_lone_pickle_file_refused(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"a": torch.zeros(2)}, path)
    with pytest.raises(UnsafeModelError, match="pickle"):
        load_model(path)


def test_remote_code_refused(llama_dir, tmp_path):
    folder = _copy(llama_dir, tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsafeModelError, match="own code"):
        load_model(folder)


def test_unsupported_architecture(llama_dir, tmp_path):
    folder = _copy(llama_dir, tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "vit"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="not a causal language model"):
        load_model(folder)


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    (b"", "not a valid GGUF"),
    (b"GGUF\x03\x00\x00\x00" + b"\xff" * 40, "not a valid GGUF"),
])
def test_bad_gguf(tmp_path, content, message):
    path = tmp_path / "model.gguf"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ModelLoadError, match=message):
        load_model(path)


def test_folder_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path)


def test_invalid_config_json(llama_dir, tmp_path):
    folder = _copy(llama_dir, tmp_path / "m")
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        load_model(folder)

def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _break_dtype(path):
    """A complete file whose header names a dtype safetensors does not know."""
    data = path.read_bytes()
    path.write_bytes(data.replace(b'"F32"', b'"X32"', 1))


def _shard(folder):
    for old in folder.glob("*.safetensors"):
        old.unlink()
    make_model("llama").save_pretrained(folder, max_shard_size="50KB")
    assert (folder / "model.safetensors.index.json").exists()


# Each corruption: how to make it, and the file the one-line message must name.
CORRUPTIONS = {
    "truncated tokenizer.json": (lambda f: _truncate(f / "tokenizer.json"), "tokenizer.json"),
    "tokenizer.json not a tokenizer": (lambda f: (f / "tokenizer.json").write_text('{"model": 3}'), "tokenizer.json"),
    "truncated tokenizer_config.json": (lambda f: _truncate(f / "tokenizer_config.json"), "tokenizer_config.json"),
    "truncated special_tokens_map.json": (lambda f: _truncate(f / "special_tokens_map.json"),
                                          "special_tokens_map.json"),
    "truncated generation_config.json": (lambda f: _truncate(f / "generation_config.json"),
                                         "generation_config.json"),
    "truncated config.json": (lambda f: _truncate(f / "config.json"), "config.json"),
    "truncated safetensors": (lambda f: _truncate(f / "model.safetensors"), "model.safetensors"),
    "safetensors header with an unknown dtype": (lambda f: _break_dtype(f / "model.safetensors"), "model.safetensors"),
    "truncated shard index": (lambda f: (_shard(f), _truncate(f / "model.safetensors.index.json")),
                              "model.safetensors.index.json"),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_corrupt_file_is_one_line_naming_it(llama_dir, tmp_path, corruption):
    folder = _copy(llama_dir, tmp_path / "m")
    corrupt, file = CORRUPTIONS[corruption]
    corrupt(folder)
    with pytest.raises(ModelLoadError) as caught:
        load_model(folder)
    message = str(caught.value)
    assert file in message and "\n" not in message


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_cli_reports_corrupt_file_as_bad_input(llama_dir, tmp_path, capsys, corruption):
    from modeldoctor.cli import main

    folder = _copy(llama_dir, tmp_path / "m")
    corrupt, file = CORRUPTIONS[corruption]
    corrupt(folder)
    assert main(["info", str(folder)]) == 2
    err = capsys.readouterr().err
    # Only the "Loading …" progress line may come before the one-line error.
    lines = [line for line in err.strip().splitlines() if not line.startswith("Loading ")]
    assert len(lines) == 1 and lines[0].startswith("modeldoctor: error:") and file in lines[0], err
    assert "internal error" not in err and "Traceback" not in err


def test_a_gguf_is_dequantized_once_and_then_read_from_the_cache(llama_dir, tmp_path, monkeypatch):
    import os

    import torch

    from modeldoctor.model import loading

    monkeypatch.setenv("MODELDOCTOR_CACHE", str(tmp_path / "cache"))
    file = tmp_path / "tiny.gguf"
    file.write_bytes(b"GGUF stand-in")
    conversions = []

    def dequantize(path, torch_dtype):
        conversions.append(path)
        folder = loading._load_folder(llama_dir, False, torch_dtype)
        return loading.LoadedModel(folder.model, folder.tokenizer, path, "gguf", "Q4_1")
    monkeypatch.setattr(loading, "dequantize_gguf", dequantize)
    first = loading.load_model(file)
    assert len(conversions) == 1 and (loading.gguf_cache_folder(file) / loading.GGUF_DONE).is_file()
    second = loading.load_model(file)
    assert len(conversions) == 1, "the second open reads the cached copy"
    assert second.path == file and second.format == "gguf" and second.stored_dtype == "Q4_1"
    for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values()):
        assert torch.equal(a, b)
    other = loading.gguf_cache_folder(file).parent / "tiny-2.5-0123456789abcdef"  # another file's copy
    other.mkdir()
    old_cache = loading.gguf_cache_folder(file)
    os.utime(file, ns=(1, 1))  # a changed file is converted again, its stale copy removed
    loading.load_model(file)
    assert len(conversions) == 2 and not old_cache.exists() and other.is_dir()
    assert file.read_bytes() == b"GGUF stand-in", "the user's file is never written"
