"""Run an exported decoder with a plain onnxruntime InferenceSession."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort


class OnnxCausalLM:
    """Full-sequence logits from a decoder ONNX model, with or without past key values."""

    def __init__(self, path: str | Path | bytes, threads: int | None = None) -> None:
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        source = path if isinstance(path, bytes) else str(path)
        self.session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        self.inputs = {i.name: i for i in self.session.get_inputs()}

    def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
        input_ids = np.asarray(input_ids, dtype=np.int64)
        batch, length = input_ids.shape
        mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
        feed = {"input_ids": input_ids}
        if "attention_mask" in self.inputs:
            feed["attention_mask"] = mask
        if "position_ids" in self.inputs:
            feed["position_ids"] = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
        for name, info in self.inputs.items():
            if name.startswith("past_key_values"):
                # An empty cache: the dims after batch and before the sequence are fixed numbers.
                shape = [batch if i == 0 else (0 if i == 2 else d) for i, d in enumerate(info.shape)]
                feed[name] = np.zeros(shape, dtype=np.float16 if "float16" in info.type else np.float32)
        return self.session.run(["logits"], feed)[0]
