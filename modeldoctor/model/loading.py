"""Load a local causal LM safely: safetensors or GGUF by default, pickle only on request."""

from __future__ import annotations

import json
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

from modeldoctor.errors import ModelLoadError, UnsafeModelError, UnsupportedModelError

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # Model Doctor never fetches weights at run time.

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# JSON files transformers reads beside config.json. It drops some of them silently when they
# are corrupt (generation_config.json, special_tokens_map.json), which would change the
# model's behaviour without a word; others fail deep inside a library without naming the file.
SIDECAR_JSON = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "added_tokens.json", "model.safetensors.index.json", "pytorch_model.bin.index.json")
CONVERT_HINT = (
    "Convert it to safetensors first (for example with transformers: "
    "model.save_pretrained(folder, safe_serialization=True)), or opt in to pickle loading "
    "with --allow-pickle if you trust where the file came from."
)


@dataclass
class LoadedModel:
    model: object  # transformers PreTrainedModel, in eval mode, float32
    tokenizer: object
    path: Path
    format: str  # safetensors | gguf | pickle
    stored_dtype: str  # what the weights are stored as on disk


DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda", "mps")


def resolve_device(device: str = "auto") -> str:
    """The device to run on: a GPU when one is there (auto), else the CPU; a named device must exist."""
    import torch

    available = {"cpu": True, "cuda": torch.cuda.is_available(),
                 "mps": bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()}
    if device == "auto":
        return "cuda" if available["cuda"] else "mps" if available["mps"] else "cpu"
    if device not in available:
        raise ModelLoadError(f"Unknown device '{device}'; choose one of {', '.join(DEVICES)}.")
    if not available[device]:
        raise ModelLoadError(f"This computer has no {device} device that PyTorch can use; choose --device cpu.")
    return device


def resolve_dtype(dtype: str, device: str):
    """float32 on the CPU by default (its half-precision matmuls are slower, not faster);
    bfloat16 on a GPU. The checkup's log-softmax and KL are computed in float32 either way."""
    import torch

    if dtype not in DTYPES:
        raise ModelLoadError(f"Unknown dtype '{dtype}'; choose one of {', '.join(DTYPES)}.")
    if dtype == "auto":
        dtype = "float32" if device == "cpu" else "bfloat16"
    return getattr(torch, dtype)


def load_model(path: str | os.PathLike, allow_pickle: bool = False, dtype: str = "auto",
               device: str = "auto") -> LoadedModel:
    """Load a Hugging Face folder or a single .gguf file without writing to it, in `dtype` on
    `device` (see resolve_dtype / resolve_device)."""
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    loaded = _load(path, allow_pickle, torch_dtype)
    if device != "cpu":
        loaded.model.to(device)
    return loaded


def _load(path: str | os.PathLike, allow_pickle: bool, torch_dtype) -> LoadedModel:
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelLoadError(f"No model at {path}: the path does not exist.")
    if path.is_file() and path.suffix.lower() == ".gguf":
        return _load_gguf(path, torch_dtype)
    if path.is_file():
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise UnsafeModelError(
                f"{path.name} is a pickle checkpoint without a config. Model Doctor opens a "
                "model folder (config.json + weights) or a .gguf file. " + CONVERT_HINT
            )
        raise ModelLoadError(
            f"{path.name} is not a model Model Doctor can open: choose a model folder "
            "(config.json + *.safetensors) or a .gguf file."
        )
    return _load_folder(path, allow_pickle, torch_dtype)


def _read_config(folder: Path) -> dict:
    config_path = folder / "config.json"
    if not config_path.is_file():
        ggufs = sorted(folder.glob("*.gguf"))
        hint = f" It holds {ggufs[0].name}: open that file instead." if ggufs else ""
        raise ModelLoadError(f"{folder} has no config.json, so it is not a model folder.{hint}")
    return _read_json_object(config_path)


def _read_json_object(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path} is not valid JSON ({exc}).") from None
    except OSError as exc:
        raise ModelLoadError(f"{path} cannot be read ({exc.strerror or exc}).") from None
    if not isinstance(value, dict):
        raise ModelLoadError(f"{path} does not hold a JSON object.")
    return value


def _check_sidecar_json(folder: Path) -> None:
    for name in SIDECAR_JSON:
        if (folder / name).is_file():
            _read_json_object(folder / name)


def check_architecture(config: dict) -> None:
    """Refuse models that need their own code, and model types that are not causal LMs."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if config.get("auto_map"):
        raise UnsafeModelError(
            "This model asks to run its own code (config.json has auto_map); Model Doctor never "
            "runs code shipped with a model. Use a model whose architecture transformers "
            "implements itself."
        )
    model_type = config.get("model_type")
    if not model_type:
        raise UnsupportedModelError("config.json names no model_type, so the architecture is unknown.")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UnsupportedModelError(
            f"Architecture '{model_type}' is not a causal language model that transformers "
            "knows, so Model Doctor cannot check it up. Supported families include llama, "
            "mistral, qwen2, phi3, gemma, gpt2 and gpt_neox."
        )


def _check_safetensors(files: list[Path]) -> str:
    """Read each header and check the file holds all the bytes it announces, and that
    safetensors itself accepts the header (dtypes, shapes, offsets)."""
    from safetensors import SafetensorError, safe_open

    dtypes: set[str] = set()
    for file in files:
        size = file.stat().st_size
        try:
            with open(file, "rb") as handle:
                raw = handle.read(8)
                if len(raw) < 8:
                    raise ValueError("shorter than a safetensors header")
                (header_len,) = struct.unpack("<Q", raw)
                if header_len > min(size - 8, 100_000_000):
                    raise ValueError("header length is beyond the end of the file")
                header = json.loads(handle.read(header_len))
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise ModelLoadError(f"{file.name} is not a valid safetensors file ({exc}).") from None
        end = 0
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtypes.add(str(info.get("dtype", "?")))
            end = max(end, int(info["data_offsets"][1]))
        if 8 + header_len + end > size:
            raise ModelLoadError(
                f"{file.name} is truncated: it announces {8 + header_len + end:,} bytes but "
                f"holds {size:,}. Copy or download it again."
            )
        try:
            with safe_open(str(file), framework="pt"):  # parses the header only; no tensor is read
                pass
        except SafetensorError as exc:
            # Its messages can list every dtype it knows; what went wrong comes first.
            reason = _first_line(exc).split(", expected one of")[0]
            raise ModelLoadError(f"{file.name} is not a valid safetensors file ({reason}).") from None
    return "/".join(sorted(dtypes)) or "unknown"


def _load_folder(folder: Path, allow_pickle: bool, torch_dtype) -> LoadedModel:
    config = _read_config(folder)
    check_architecture(config)
    _check_sidecar_json(folder)
    safetensors = sorted(folder.glob("*.safetensors"))
    pickles = sorted(p for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if safetensors:
        stored = _check_safetensors(safetensors)
        fmt = "safetensors"
    elif pickles:
        if not allow_pickle:
            raise UnsafeModelError(
                f"{folder.name} holds only pickle weights ({pickles[0].name}); unpickling can run "
                "arbitrary code, so Model Doctor refuses it by default. " + CONVERT_HINT
            )
        stored, fmt = str(config.get("torch_dtype") or config.get("dtype") or "unknown"), "pickle"
    else:
        raise ModelLoadError(f"{folder} has a config.json but no weights (*.safetensors).")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        # transformers 4.57 unpickles with torch.load(weights_only=True) when use_safetensors=False.
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch_dtype, trust_remote_code=False, use_safetensors=(fmt == "safetensors"),
            local_files_only=True,
        )
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ModelLoadError(f"Could not load the weights in {folder}: {_first_line(exc)}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(
            f"{folder} has no usable tokenizer (tokenizer.json or tokenizer_config.json): "
            f"{_first_line(exc)}"
        ) from None
    except Exception as exc:
        # The tokenizers library raises a bare Exception for a tokenizer.json it cannot parse.
        if type(exc) is not Exception or not (folder / "tokenizer.json").is_file():
            raise
        raise ModelLoadError(
            f"{folder / 'tokenizer.json'} is not a tokenizer the tokenizers library can read: {_first_line(exc)}"
        ) from None
    model.eval()
    return LoadedModel(model, tokenizer, folder, fmt, stored)


GGUF_DONE = ".modeldoctor-gguf.json"


def gguf_cache_folder(file: Path) -> Path:
    """Where the dequantized copy of this exact file (path, size and modification time) is kept."""
    import hashlib

    from modeldoctor.model.sample import cache_root

    stat = file.stat()
    key = hashlib.sha256(f"{file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / "gguf" / f"{file.stem}-{key}"


def _load_gguf(file: Path, torch_dtype) -> LoadedModel:
    """Dequantize once: the float copy is cached (atomically) in the user cache and read from there
    the next time the same, unchanged file is opened."""
    cached = gguf_cache_folder(file)
    if (cached / GGUF_DONE).is_file():
        try:
            stored = json.loads((cached / GGUF_DONE).read_text(encoding="utf-8"))["stored"]
            loaded = _load_folder(cached, False, torch_dtype)
            return LoadedModel(loaded.model, loaded.tokenizer, file, "gguf", stored)
        except (ModelLoadError, OSError, ValueError, KeyError):
            shutil.rmtree(cached, ignore_errors=True)  # a damaged cache: convert again
    loaded = dequantize_gguf(file, torch_dtype)
    _cache_gguf(loaded, cached)
    return loaded


def _cache_gguf(loaded: LoadedModel, cached: Path) -> None:
    """Best effort: a full disk or a read-only cache only costs the next open a conversion."""
    import re

    own = re.compile(re.escape(loaded.path.stem) + r"-[0-9a-f]{16}")  # this file's copies, not another's
    for stale in cached.parent.glob(f"{loaded.path.stem}-*"):  # earlier versions of the same file
        if stale != cached and own.fullmatch(stale.name):
            shutil.rmtree(stale, ignore_errors=True)
    staging = cached.parent / f".{cached.name}.partial-{os.getpid()}"
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        needed = sum(p.numel() * p.element_size() for p in loaded.model.parameters()) * 1.1
        if shutil.disk_usage(cached.parent).free < needed:
            return
        loaded.model.save_pretrained(staging, safe_serialization=True)
        loaded.tokenizer.save_pretrained(staging)
        (staging / GGUF_DONE).write_text(json.dumps({"source": str(loaded.path), "stored": loaded.stored_dtype}),
                                         encoding="utf-8")
        if cached.exists():
            shutil.rmtree(cached)
        os.replace(staging, cached)
    except (OSError, RuntimeError, ValueError):
        pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def dequantize_gguf(file: Path, torch_dtype) -> LoadedModel:
    try:
        from gguf import GGUFReader

        reader = GGUFReader(file)
        arch_field = reader.fields.get("general.architecture")
        arch = bytes(arch_field.parts[-1]).decode("utf-8") if arch_field else "?"
        types = {t.tensor_type.name for t in reader.tensors}
    except Exception as exc:  # gguf raises bare ValueError/struct/numpy errors on corrupt files
        raise ModelLoadError(f"{file.name} is not a valid GGUF file ({_first_line(exc)}).") from None
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    if arch not in GGUF_CONFIG_MAPPING:
        raise UnsupportedModelError(
            f"{file.name} holds a '{arch}' model; transformers cannot dequantize that GGUF "
            f"architecture. Supported: {', '.join(sorted(GGUF_CONFIG_MAPPING))}."
        )
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(
            file.parent, gguf_file=file.name, dtype=torch_dtype, local_files_only=True
        )
        tokenizer = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name, local_files_only=True)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"Could not dequantize {file.name}: {_first_line(exc)}") from None
    model.eval()
    return LoadedModel(model, tokenizer, file, "gguf", "/".join(sorted(types)))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
