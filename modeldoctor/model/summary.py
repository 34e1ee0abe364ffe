"""A model's identity card: what the user loaded, in figures."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from modeldoctor.model.anatomy import Anatomy
from modeldoctor.model.loading import LoadedModel


@dataclass(frozen=True)
class ModelSummary:
    name: str
    path: str
    format: str
    family: str
    architecture: str
    blocks: int
    linears: int
    parameters: int
    hidden_size: int
    heads: int
    vocab_size: int
    stored_dtype: str
    compute_dtype: str
    memory_bytes: int
    tokenizer: str
    head_tied: bool = False  # the LM head ("head", a linear like the others) shares the embedding's weight
    kind: str = "transformer"  # transformer | state-space | hybrid (Anatomy.kind)
    attention_blocks: int = 0
    state_space_blocks: int = 0
    block_kinds: tuple[str, ...] = ()  # each block's BlockParts.kind: attention | state-space | none

    def as_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[tuple[str, str]]:
        return [
            ("Model", self.name), ("Format", self.format), ("Family", self.family),
            ("Architecture", self.architecture), ("Blocks", self.blocks_text()),
            ("Linear layers", f"{self.linears} in the blocks, and the LM head"),
            ("LM head", "linear 'head', " + ("tied to the token embedding" if self.head_tied else "its own weights")),
            ("Parameters", f"{self.parameters / 1e6:,.1f} M"),
            ("Hidden size / heads", f"{self.hidden_size} / "
                                    + (str(self.heads) if self.attention_blocks or self.kind == "transformer"
                                       else "no attention")),
            ("Stored as", self.stored_dtype), ("Runs in", self.compute_dtype),
            ("Memory", f"{self.memory_bytes / 2**20:,.0f} MiB"),
            ("Tokenizer", f"{self.tokenizer}, {self.vocab_size:,} tokens"), ("Path", self.path),
        ]

    def blocks_text(self) -> str:
        """'24', or what mixes the tokens where attention does not do it everywhere."""
        if self.kind == "state-space":
            return f"{self.blocks} state-space (Mamba) blocks, no attention"
        if self.kind == "hybrid":
            return (f"{self.blocks}, hybrid: {self.attention_blocks} attention + {self.state_space_blocks} "
                    "state-space (Mamba) blocks")
        return str(self.blocks)


def summarize(loaded: LoadedModel, anatomy: Anatomy) -> ModelSummary:
    model = loaded.model
    params = list(model.parameters())
    # Tied embeddings appear once in parameters(); count unique storage.
    unique = {p.data_ptr(): p for p in params}.values()
    count = sum(p.numel() for p in unique)
    memory = sum(p.numel() * p.element_size() for p in unique)
    dtype = str(next(iter(unique)).dtype).replace("torch.", "")
    name = loaded.path.stem if loaded.path.is_file() else loaded.path.name
    return ModelSummary(
        name=name, path=str(loaded.path), format=loaded.format,
        family=str(getattr(model.config, "model_type", "?")), architecture=type(model).__name__,
        blocks=anatomy.num_blocks, linears=len(anatomy.linear_names()), parameters=count,
        hidden_size=anatomy.hidden_size, heads=anatomy.num_heads,
        vocab_size=int(anatomy.head.weight.shape[0]), stored_dtype=loaded.stored_dtype,
        compute_dtype=dtype, memory_bytes=memory, tokenizer=type(loaded.tokenizer).__name__,
        head_tied=anatomy.head_tied, kind=anatomy.kind,
        attention_blocks=len(anatomy.blocks_of_kind("attention")),
        state_space_blocks=len(anatomy.blocks_of_kind("state-space")),
        block_kinds=tuple(b.kind for b in anatomy.blocks),
    )
