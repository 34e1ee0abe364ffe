"""ONNX export through optimum-onnx, onnxruntime quantization with exclusions, validation."""

# The export precisions (importing this does not load onnx: the CLI builds its options from it).
PRECISIONS = ("fp32", "int8", "int4", "int8-dynamic")

# The MatMulNBits formats a linear can be written in: (bits, inputs per block). "int8" and "int4"
# are blocks of 32, the finest; larger blocks store fewer scales and round more coarsely.
BLOCK_FORMATS = {"int8": (8, 32), "int8-b64": (8, 64), "int8-b128": (8, 128), "int4": (4, 32), "int4-b128": (4, 128)}
FORMATS = ("fp32", *BLOCK_FORMATS, "int8-dynamic")
# The formats an export of each precision may mix (fp32 aside): an int4 export raises linears to 8 bits.
PRECISION_FORMATS = {"fp32": (), "int8": ("int8", "int8-b64", "int8-b128"),
                     "int4": ("int4", "int4-b128", "int8", "int8-b64", "int8-b128"), "int8-dynamic": ("int8-dynamic",)}


def block_probe(fmt: str) -> str:
    """The checkup modification that simulates a block format bit for bit, e.g. int8-b32."""
    bits, block = BLOCK_FORMATS[fmt]
    return f"int{bits}-b{block}"


def bytes_per_weight(fmt: str) -> float:
    """Bytes a weight takes on disk when its rows fill whole blocks (for ordering formats):
    MatMulNBits stores the packed weights plus an fp32 scale and a zero point (of the same width)
    per block; int8 dynamic one scale per tensor."""
    if fmt in BLOCK_FORMATS:
        bits, block = BLOCK_FORMATS[fmt]
        return bits / 8 + (4 + bits / 8) / block
    return {"fp32": 4.0, "int8-dynamic": 1.0}[fmt]


def stored_bytes(fmt: str, outputs: int, inputs: int) -> int:
    """Bytes an (outputs × inputs) weight takes on disk in `fmt`, as the exporter writes it: a
    block format pads each row to whole blocks (576 inputs take 5 blocks of 128, 640 values)."""
    if fmt not in BLOCK_FORMATS:
        return int(outputs * inputs * bytes_per_weight(fmt))
    bits, block = BLOCK_FORMATS[fmt]
    blocks = -(-inputs // block)
    return outputs * (blocks * block * bits // 8 + blocks * 4 + -(-blocks * bits // 8))
