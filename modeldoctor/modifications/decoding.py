"""Decoding changes: sampling temperature, top-k, top-p, repetition penalty, beam search.

They leave the weights alone; the checkup measures how far generations drift from the
reference settings (greedy decoding) on the built-in prompts.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass

from modeldoctor.modifications.base import Modification, register


@dataclass(frozen=True)
class DecodingSettings:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    num_beams: int = 1

    def generate_kwargs(self) -> dict:
        kwargs = {"do_sample": self.do_sample, "num_beams": self.num_beams,
                  "repetition_penalty": self.repetition_penalty}
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)
        else:
            kwargs.update(temperature=None, top_k=None, top_p=None)
        return kwargs

    def as_dict(self) -> dict:
        return asdict(self)


GREEDY = DecodingSettings()


class DecodingChange(Modification):
    family = "decoding"
    scopes = ("model",)

    def __init__(self, name: str, settings: DecodingSettings) -> None:
        super().__init__(name)
        self.settings = settings

    @contextlib.contextmanager
    def applied(self, ctx, targets):
        yield  # nothing in the model changes


def _float(text: str) -> float:
    return float(text)


@register(r"decode-(?P<kind>temp|topk|topp|rep|beam)-(?P<value>[0-9]+(?:\.[0-9]+)?)|decode-sample",
          "decoding settings compared with greedy decoding",
          ("decode-sample", "decode-temp-0.7", "decode-topk-40", "decode-topp-0.9", "decode-rep-1.3", "decode-beam-4"))
def _decoding(match):
    kind, value = match["kind"], match["value"]
    if kind is None:
        settings = DecodingSettings(do_sample=True)
    elif kind == "temp":
        settings = DecodingSettings(do_sample=True, temperature=_float(value))
    elif kind == "topk":
        settings = DecodingSettings(do_sample=True, top_k=int(float(value)))
    elif kind == "topp":
        settings = DecodingSettings(do_sample=True, top_p=_float(value))
    elif kind == "rep":
        settings = DecodingSettings(repetition_penalty=_float(value))
    else:
        settings = DecodingSettings(num_beams=int(float(value)))
    return DecodingChange(match[0], settings)
