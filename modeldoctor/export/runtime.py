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
        mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
        feed = self._feed(input_ids, mask, start=0)
        if "position_ids" in feed:
            feed["position_ids"] = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
        return self.session.run(["logits"], feed)[0]

    def decode_step_seconds(self, cached: int, steps: int = 8) -> float | None:
        """Median seconds of one-token decode steps after a `cached`-token prefill (the deployed
        generation loop's cost per token); None for a model without a cache."""
        import time

        past_names = [n for n in self.inputs if n.startswith("past_key_values")]
        if not past_names:
            return None
        ids = (np.arange(cached, dtype=np.int64) % 1000 + 10)[None]
        out_names = [o.name for o in self.session.get_outputs()]
        outputs = dict(zip(out_names, self.session.run(None, self._feed(ids, np.ones_like(ids), start=0))))
        times = []
        length = cached
        for step in range(steps + 1):  # the first step warms up
            length += 1
            feed = self._feed(np.asarray([[11 + step]], dtype=np.int64), np.ones((1, length), dtype=np.int64),
                              start=length - 1)
            for name in past_names:
                feed[name] = outputs[name.replace("past_key_values", "present")]
            began = time.perf_counter()
            outputs = dict(zip(out_names, self.session.run(None, feed)))
            if step:
                times.append(time.perf_counter() - began)
        return float(np.median(times))

    def greedy(self, prompt_ids: list[int], new_tokens: int) -> list[int]:
        """Greedy continuation using the model's key/value cache, one token per step."""
        past_names = [n for n in self.inputs if n.startswith("past_key_values")]
        ids = np.asarray([prompt_ids], dtype=np.int64)
        feed = self._feed(ids, np.ones_like(ids), start=0)
        out_names = [o.name for o in self.session.get_outputs()]
        tokens: list[int] = []
        length = ids.shape[1]
        for _ in range(new_tokens):
            outputs = dict(zip(out_names, self.session.run(None, feed)))
            token = int(outputs["logits"][0, -1].argmax())
            tokens.append(token)
            if not past_names:  # no cache: rerun the whole sequence
                ids = np.concatenate([ids, [[token]]], axis=1)
                feed = self._feed(ids, np.ones_like(ids), start=0)
                continue
            length += 1
            step = np.asarray([[token]], dtype=np.int64)
            feed = self._feed(step, np.ones((1, length), dtype=np.int64), start=length - 1)
            for name in past_names:
                feed[name] = outputs[name.replace("past_key_values", "present")]
        return tokens

    def _feed(self, input_ids: np.ndarray, attention_mask: np.ndarray, start: int) -> dict:
        feed = {"input_ids": input_ids}
        if "attention_mask" in self.inputs:
            feed["attention_mask"] = attention_mask
        if "position_ids" in self.inputs:
            feed["position_ids"] = np.arange(start, start + input_ids.shape[1], dtype=np.int64)[None]
        for name, info in self.inputs.items():
            if name.startswith("past_key_values"):
                # An empty cache: the dims after batch and before the sequence are fixed numbers.
                shape = [input_ids.shape[0] if i == 0 else (0 if i == 2 else d) for i, d in enumerate(info.shape)]
                feed[name] = np.zeros(shape, dtype=np.float16 if "float16" in info.type else np.float32)
        return feed
