"""Plain-language meanings of the terms the app uses, for tooltips and the "What does this mean?" dialog."""

from __future__ import annotations

import html

from PySide6.QtWidgets import QDialog, QDialogButtonBox, QTextBrowser, QVBoxLayout

TERMS = {
    "KL (nats)": "How far the modified model's next-token probabilities are from the original's, averaged over "
                 "the evaluation tokens (Kullback–Leibler divergence, in nats). 0 means identical; larger is "
                 "worse. The diagnosis says what a given KL means on your model: the share of next-token top "
                 "choices that change in probes near it.",
    "bleeding": "A layer bleeds when modifying it alone makes the model's mean KL exceed the threshold you set "
                "on the Plan page, or when it is a clear outlier among the layers of the same modification.",
    "threshold": "The mean KL above which a layer counts as bleeding (0.01 nats by default). Lower it to be "
                 "stricter. Colours: mild above the threshold, moderate above 5×, severe above 50×.",
    "isolated": "One layer (or block) modified at a time, the rest of the model left as it is: which single "
                "layers are fragile.",
    "cumulative": "Layers modified one after another, 1..k, keeping the earlier ones modified: how far along the "
                  "model a change can go before the whole model bleeds.",
    "strength sweep": "The same change at growing strength (8 bits down to 2, sparsity 10% up to 90%) on the whole "
                      "model and on each block: where robustness breaks. The knee is the step where the KL jumps "
                      "the most.",
    "estimated / measured": "Quantization probes are first estimated all at once from one backward pass (a "
                            "second-order estimate, drawn pale). The highest estimates and a few random ones are "
                            "then measured exactly (solid), then any estimate that could still reach the top or the "
                            "threshold, given how far the measured ones ran above their estimates. Measure "
                            "everything with the Plan page's Exactness box.",
    "low rank (SVD)": "Each linear replaced by the product of two thin matrices that keep only its strongest "
                      "directions (a truncated singular value decomposition). It saves memory only below about "
                      "half the rank. Activation-aware SVD weighs each input by how large it runs on real text "
                      "first, so it keeps the directions the inputs actually use.",
    "KV cache": "The keys and values each attention block stores for every token it has read, so generation does "
                "not recompute them. Runtimes can store them in fewer bits (llama.cpp's -ctk q8_0, vLLM's fp8): "
                "memory for longer contexts, paid for in every later token's attention.",
    "RoPE scaling": "Stretching the rotary position embedding (linear interpolation, NTK-aware, YaRN) so a model "
                    "reads past the length it was trained for. The probe shows what the stretch costs on text "
                    "the model could already read.",
    "long-context probe": "Each chosen modification applied to the whole model and measured on one long sequence "
                          "of the evaluation text at growing lengths (up to the model's limit where the text "
                          "reaches it; more evaluation tokens on the Data page reach longer ones), with the "
                          "original's speed at each length: does the damage grow with context?",
    "int8 dynamic": "Weights stored as 8-bit integers with one scale per tensor, activations quantized to 8 bits "
                    "on every call: what onnxruntime's quantize_dynamic writes.",
    "int4 g32 asym": "Weights stored as 4-bit integers in groups of 32 with their own scale and zero point (no "
                     "activation quantization): what the int4 export (MatMulNBits) writes.",
    "int8 b32": "Weights stored as 8-bit integers in blocks of 32 with their own scale and zero point, "
                "activations quantized to 8 bits per block of 32 as the multiply runs: what the int8 export "
                "(MatMulNBits, accuracy level 4) writes; a head tied to the embedding becomes one 8-bit table "
                "that both read.",
    "larger blocks": "The same formats with one scale and zero point per 64 or 128 weights instead of 32 "
                     "(int8-b64, int8-b128, int4-b128): fewer bytes per weight, coarser rounding. The export "
                     "mixes them in where the checkup measured them safe.",
    "int4 mixed": "Most linears at 4 bits in blocks of 32 (or 128 where a checkup measured them); the fragile "
                  "ones at 8 bits, and the head too unless the checkup clears 4 (all MatMulNBits with 8-bit "
                  "activations per block), chosen from the checkup's figures.",
    "Wanda": "Pruning that removes the weights with the smallest |weight| × input norm, per output row (Sun et "
             "al., 2023). Magnitude pruning uses |weight| alone; 2:4 keeps two of every four weights.",
    "SmoothQuant": "Moves the size of activation outliers into the weights with a per-channel scale folded into "
                   "the preceding norm or linear, so int8 activations lose less. The float model is unchanged.",
    "AWQ": "Activation-aware weight quantization: scales the input channels that matter most before "
           "quantizing the weights to 4 bits, folded so the float model is unchanged.",
    "mixed precision": "Keeps the most fragile linears in fp32 within a budget of weights, and quantizes the rest.",
    "gradient-aware pruning": "Prunes by |weight| × input norm × a gradient term, protecting weights the loss "
                              "depends on.",
    "temperature calibration": "Divides the modified model's logits by a fitted temperature so its confidence "
                               "matches the original's.",
    "recovery prompts": "Compressed models often displace knowledge rather than lose it; a short instruction "
                        "before the question can bring answers back. The best prompt is chosen on one half of "
                        "the knowledge probes and reported on the other.",
    "perplexity": "exp(mean negative log-likelihood) of the text: how surprised the model is by it. Lower is "
                  "better; compare it with the original's.",
    "top-1 agreement": "The share of positions where the modified model's most likely next token is the "
                       "original's.",
    "calibration / selection / evaluation text": "Fits (scales, norms, gradients) use calibration text; choices "
                                                  "(what to keep, which method or prompt) use separate "
                                                  "selection text; every reported figure is on evaluation text "
                                                  "that no choice saw.",
}


def tip(term: str) -> str:
    """A tooltip: the term in bold and its meaning."""
    return f"<b>{html.escape(term)}</b>: {html.escape(TERMS[term])}"


class GlossaryDialog(QDialog):
    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.setWindowTitle("What does this mean?")
        self.resize(640, 560)
        layout = QVBoxLayout(self)
        self.text = QTextBrowser()
        self.text.setHtml("".join(f"<h3>{html.escape(term)}</h3><p>{html.escape(meaning)}</p>"
                                  for term, meaning in TERMS.items()))
        layout.addWidget(self.text)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Close)
        buttons.rejected.connect(self.reject)
        layout.addWidget(buttons)
