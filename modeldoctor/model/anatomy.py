"""Find a causal LM's blocks, linears, norms and head from its structure, not from names per family.

Blocks are the ModuleList of identical layers; the head and embeddings come from the
transformers API; the final norm(s) and each block's output projections are found by
watching the order in which modules run during one tiny forward pass.

Linears are named "block.relative.name" ("3.mlp.down_proj"), and the LM head is the linear
named HEAD: it runs after the last block, so it belongs to no block.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from modeldoctor.errors import UnsupportedModelError
from modeldoctor.model.moe import MoEParts, find_moe

HEAD = "head"  # the LM head's linear name: a probe, keep and export target like any block linear


class _Stopped(Exception):
    """Raised by stop_before's hook: the forward pass has gone as far as it was wanted."""


@contextlib.contextmanager
def stop_before(model: nn.Module, module: nn.Module) -> Iterator[None]:
    """Within it, a forward pass of `model` ends quietly when it reaches `module` (what the hooks
    before it recorded is all that is wanted). A pass cut short skips transformers' own clean-up
    (asked for attentions, it wraps modules' forwards and puts them back at the end), so every
    module's forward is put back as it was."""
    def stop(*args):
        raise _Stopped

    forwards = {m: vars(m).get("forward") for m in model.modules()}
    handle = module.register_forward_pre_hook(stop)
    try:
        with contextlib.suppress(_Stopped):
            yield
    finally:
        handle.remove()
        for each, forward in forwards.items():
            if vars(each).get("forward") is not forward:
                if forward is None:
                    del each.forward
                else:
                    each.forward = forward


def is_linear(module: nn.Module) -> bool:
    """nn.Linear, or GPT-2 style Conv1D (a linear with its weight stored transposed)."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def weight_matrix(module: nn.Module, stored_like_weight: torch.Tensor | None = None) -> torch.Tensor:
    """The weight as (out_features, in_features); a view, so in-place edits reach the module.
    Given a tensor stored like the weight parameter (its gradient, say), orients that instead."""
    weight = module.weight if stored_like_weight is None else stored_like_weight
    return weight.t() if type(module).__name__ == "Conv1D" else weight


def _is_attention(name: str, module: nn.Module) -> bool:
    cls = type(module).__name__.lower()
    leaf = name.rsplit(".", 1)[-1].lower()
    return "attention" in cls or leaf in {"attn", "self_attn", "attention", "self_attention"}


def _is_mlp(name: str, module: nn.Module) -> bool:
    cls = type(module).__name__.lower()
    leaf = name.rsplit(".", 1)[-1].lower()
    return "mlp" in cls or leaf in {"mlp", "feed_forward", "ffn", "ff"}


def _is_state_space(name: str, module: nn.Module) -> bool:
    """A state-space (Mamba) mixer: its own A_log parameter (the state decay, which every Mamba
    variant transformers implements keeps), or a Mamba mixer class."""
    cls = type(module).__name__.lower()
    return "A_log" in module._parameters or ("mixer" in cls and ("mamba" in cls or "ssm" in cls))


@dataclass
class BlockParts:
    index: int
    module: nn.Module
    linears: dict[str, nn.Module]  # relative name ("mlp.down_proj") -> module, in run order
    attention_name: str | None
    mlp_name: str | None
    attention_out: str | None  # relative name of the attention output projection
    mlp_down: str | None  # relative name of the MLP down projection
    norms: list[str] = field(default_factory=list)
    moe: MoEParts | None = None  # the block's mixture of experts; None in a dense block
    mixer_name: str | None = None  # the state-space (Mamba) mixer, in SSM and hybrid blocks

    @property
    def kind(self) -> str:
        """What mixes the tokens: "attention", "state-space" or "none" (an MLP-only block)."""
        return "attention" if self.attention_name else "state-space" if self.mixer_name else "none"


@dataclass
class Anatomy:
    blocks_path: str
    blocks: list[BlockParts]
    embedding: nn.Module
    head: nn.Module
    tail: list[nn.Module]  # modules between the last block and the head (the final norm)
    tail_names: list[str]
    head_name: str  # the head module's full name in the model, e.g. lm_head
    hidden_size: int
    num_heads: int
    head_dim: int
    block_list: nn.ModuleList  # the live list: structural modifications swap entries in it
    block_returns_tuple: bool  # GPT-2 style blocks return (hidden, ...); Llama style a tensor
    # The rotary position embeddings (transformers' *RotaryEmbedding: an inv_freq buffer and an
    # attention_scaling); empty for learned or no positions (GPT-2, OPT, Mamba).
    rotaries: list[nn.Module] = field(default_factory=list)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def kind(self) -> str:
        """"transformer" (attention in every block), "state-space" (no attention at all) or
        "hybrid" (some blocks of each)."""
        kinds = {b.kind for b in self.blocks}
        if "state-space" not in kinds:
            return "transformer"
        return "hybrid" if "attention" in kinds else "state-space"

    def blocks_of_kind(self, kind: str) -> list[int]:
        return [b.index for b in self.blocks if b.kind == kind]

    @property
    def head_tied(self) -> bool:
        """The head reuses the token embedding's weight (one tensor serves both)."""
        return self.head.weight is self.embedding.weight

    def linear_names(self) -> list[str]:
        """All block linears as "block.relative.name", in depth then run order."""
        return [f"{b.index}.{rel}" for b in self.blocks for rel in b.linears]

    def linear_targets(self) -> list[str]:
        """Every linear a modification, a keep list or the export can name: the block linears,
        then the LM head (HEAD)."""
        return self.linear_names() + [HEAD]

    def moe_blocks(self) -> list[BlockParts]:
        return [b for b in self.blocks if b.moe is not None]

    def expert_targets(self) -> list[str]:
        """The experts scope: per MoE block its router, each expert, then its shared experts,
        as "block.relative.name" ("3.mlp.gate", "3.mlp.experts.5", "3.mlp.shared_expert")."""
        return [f"{b.index}.{name}" for b in self.moe_blocks()
                for name in (b.moe.router, *b.moe.experts, *b.moe.shared)]

    def expert_linears(self, target: str) -> list[str] | None:
        """The linears an expert or shared expert target stands for; None for any other target."""
        moe, index, rel = self._moe_of(target)
        linears = moe.experts.get(rel, moe.shared.get(rel)) if moe is not None else None
        return None if linears is None else [f"{index}.{n}" for n in linears]

    def routed_expert_linear(self, name: str) -> bool:
        """Whether a linear belongs to a routed expert (not a shared one): it sees only the rows
        of the tokens routed to it."""
        moe, _, rel = self._moe_of(name)
        return moe is not None and any(rel in linears for linears in moe.experts.values())

    def _moe_of(self, name: str):
        """(the mixture of experts of the block a "block.relative" name is in, or None; index; rel)."""
        head, _, rel = name.partition(".")
        if not (rel and head.isdigit() and int(head) < self.num_blocks):
            return None, None, rel
        return self.blocks[int(head)].moe, int(head), rel

    def linear(self, name: str) -> nn.Module:
        if name == HEAD:
            return self.head
        try:
            index, rel = split_linear_name(name)
            return self.blocks[index].linears[rel]
        except (ValueError, IndexError, KeyError):
            raise KeyError(f"no linear named {name}") from None

    @property
    def after_blocks(self) -> nn.Module:
        """The first module the model runs after its last block: the final norm, or the head."""
        return self.tail[0] if self.tail else self.head

    def block_of(self, target: str) -> int:
        """The first block a target's modification changes the input of; the head comes after
        the last block (num_blocks), so a probe of it replays only the final norm and the head."""
        if target == HEAD:
            return self.num_blocks
        return split_linear_name(target)[0] if "." in target else int(target)

    def qualified_name(self, name: str) -> str:
        """The module's full name in the model, e.g. model.layers.3.mlp.down_proj."""
        if name == HEAD:
            return self.head_name
        index, rel = split_linear_name(name)
        return f"{self.blocks_path}.{index}.{rel}"


def is_block_target(target: str) -> bool:
    """A block index ("3"), as opposed to a linear ("3.mlp.down_proj" or HEAD)."""
    return target.isdigit()


def split_linear_name(name: str) -> tuple[int, str]:
    head, _, rel = name.partition(".")
    return int(head), rel


def _find_block_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    expected = getattr(model.config, "num_hidden_layers", None)
    candidates = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            kinds = {type(child) for child in module}
            # Identical layers; or, in a hybrid such as Jamba, the config's layer count of two kinds.
            if len(kinds) == 1 or len(module) == expected:
                params = sum(p.numel() for p in module.parameters())
                candidates.append((len(module) == expected, params, name, module))
    if not candidates:
        raise UnsupportedModelError(
            f"Could not find the repeated transformer blocks of {type(model).__name__}; "
            "this architecture is not supported."
        )
    candidates.sort(key=lambda c: (c[0], c[1]), reverse=True)
    _, _, name, module = candidates[0]
    return name, module


def find_anatomy(model: nn.Module) -> Anatomy:
    blocks_path, block_list = _find_block_list(model)
    embedding = model.get_input_embeddings()
    head = model.get_output_embeddings()
    if embedding is None or head is None:
        raise UnsupportedModelError(f"{type(model).__name__} has no token embedding or LM head.")
    order, returns_tuple = _trace_call_order(model, block_list)

    blocks = []
    for index, block in enumerate(block_list):
        prefix = f"{blocks_path}.{index}."
        named = {n: m for n, m in block.named_modules() if n}
        linears = {n: m for n, m in named.items() if is_linear(m)}
        ran = [q[len(prefix):] for q in order if q.startswith(prefix) and q[len(prefix):] in linears]
        linears = {n: linears[n] for n in ran + [n for n in linears if n not in ran]}
        attention = next((n for n, m in named.items() if _is_attention(n, m)), None)
        mlp = next((n for n, m in named.items() if _is_mlp(n, m)), None)
        mixer = next((n for n, m in named.items() if _is_state_space(n, m)), None)
        attn_lin = [n for n in linears if attention and n.startswith(attention + ".")]
        if mlp is not None:
            mlp_lin = [n for n in linears if n.startswith(mlp + ".")]
        else:  # no MLP module: its linears sit in the block itself (OPT's fc1, fc2), not in a mixer
            mlp_lin = [n for n in linears if not any(part and n.startswith(part + ".") for part in (attention, mixer))]
        norms = [n for n, m in named.items() if "norm" in type(m).__name__.lower()]
        moe = find_moe(block, linears)
        if moe is not None:  # the MLP is the mixture; its output is a routed sum, no one down projection
            mlp, mlp_lin = moe.module_name, []
        blocks.append(BlockParts(
            index=index, module=block, linears=linears, attention_name=attention, mlp_name=mlp,
            attention_out=attn_lin[-1] if attn_lin else None, mlp_down=mlp_lin[-1] if mlp_lin else None,
            norms=norms, moe=moe, mixer_name=mixer,
        ))
    if not any(b.linears for b in blocks):
        raise UnsupportedModelError(f"The blocks of {type(model).__name__} contain no linear layers.")

    modules = dict(model.named_modules())
    head_name = next(n for n, m in modules.items() if m is head)
    last_block = f"{blocks_path}.{len(block_list) - 1}"
    after = order[order.index(last_block) + 1: order.index(head_name)]
    # Keep leaves only: containers such as the base model finish after their children.
    after = [n for n in after if not n.startswith(blocks_path) and not blocks_path.startswith(n + ".")
             and n != "" and not any(o.startswith(n + ".") for o in after)]
    config = model.config
    hidden = int(getattr(config, "hidden_size", 0) or embedding.weight.shape[1])
    heads = int(getattr(config, "num_attention_heads", 1))
    head_dim = int(getattr(config, "head_dim", 0) or hidden // heads)
    anatomy = Anatomy(
        blocks_path=blocks_path, blocks=blocks, embedding=embedding, head=head,
        tail=[modules[n] for n in after], tail_names=after, head_name=head_name, hidden_size=hidden,
        num_heads=heads, head_dim=head_dim, block_list=block_list, block_returns_tuple=returns_tuple,
        rotaries=[m for m in model.modules()
                  if isinstance(getattr(m, "inv_freq", None), torch.Tensor) and hasattr(m, "attention_scaling")],
    )
    return anatomy


def _trace_call_order(model: nn.Module, block_list: nn.ModuleList) -> tuple[list[str], bool]:
    """Names of modules in the order their forward finished during a 2-token forward pass,
    and whether a block returns a tuple."""
    order: list[str] = []
    outputs: list[object] = []
    handles = [block_list[0].register_forward_hook(lambda m, a, o: outputs.append(o))]
    for name, module in model.named_modules():
        handles.append(module.register_forward_hook(lambda m, a, o, name=name: order.append(name)))
    try:
        ids = torch.tensor([[1, 2]], dtype=torch.long)
        with torch.inference_mode():
            model(input_ids=ids, use_cache=False)
    except Exception as exc:
        raise UnsupportedModelError(
            f"A test forward pass of {type(model).__name__} failed ({exc}); not supported."
        ) from None
    finally:
        for handle in handles:
            handle.remove()
    return order, isinstance(outputs[0], tuple)


@contextlib.contextmanager
def gradients_only_for(model: nn.Module, weights=()) -> Iterator[None]:
    """Backward passes inside compute gradients for `weights` (and for activations that ask)
    only: no other parameter requires one, so none gets a `.grad` as large as itself (a whole
    second model in memory). Flags are restored and `.grad`s dropped on exit."""
    saved = {p: p.requires_grad for p in model.parameters()}
    try:
        for param in saved:
            param.requires_grad_(False)
        for weight in weights:
            weight.requires_grad_(True)
        yield
    finally:
        for param, flag in saved.items():
            param.requires_grad_(flag)
            param.grad = None
