"""Find a block's mixture of experts from its structure: a list of identical MLPs (the experts)
beside a linear with one output per expert (the router), in the same module.

This finds Mixtral's `block_sparse_moe`, Qwen2-MoE's and Qwen3-MoE's and OLMoE's `mlp` without
a list of names per family. Names follow the anatomy's "block.relative.name": the router of
block 3 is a linear ("3.mlp.gate"), expert 5 is a target of its own ("3.mlp.experts.5") that
stands for all its linears, and so is a shared expert ("3.mlp.shared_expert").
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

# The attribute a MoE module's forward reads its number of experts per token from
# (transformers 4.57: `top_k` in Mixtral, Qwen2/3-MoE, OLMoE; older code used the config's name).
TOP_K_ATTRIBUTES = ("top_k", "num_experts_per_tok", "moe_top_k")


@dataclass
class MoEParts:
    """One block's mixture of experts; every name is relative to the block."""

    module_name: str  # the MoE module ("mlp", "block_sparse_moe")
    module: nn.Module
    router: str  # the router linear ("mlp.gate"): one logit per expert
    experts: dict[str, list[str]]  # expert ("mlp.experts.5") -> its linears, in the anatomy's order
    shared: dict[str, list[str]] = field(default_factory=dict)  # shared expert -> its linears
    shared_gates: list[str] = field(default_factory=list)  # other linears of the MoE module (a shared expert's gate)
    top_k_attribute: str | None = None  # the module attribute holding k

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    @property
    def top_k(self) -> int:
        return int(getattr(self.module, self.top_k_attribute)) if self.top_k_attribute else 1

    def expert_index(self, expert: str) -> int:
        return list(self.experts).index(expert)


def find_moe(block: nn.Module, linears: dict[str, nn.Module]) -> MoEParts | None:
    """The block's mixture of experts, or None for a dense block. `linears` are the block's
    linears by relative name, in the anatomy's (run) order."""
    named = dict(block.named_modules())
    for list_name, experts in named.items():
        if not (isinstance(experts, nn.ModuleList) and len(experts) > 1):
            continue
        if len({type(e) for e in experts}) != 1 or not any(isinstance(m, nn.Linear) for m in experts[0].modules()):
            continue
        parent_name, _, _ = list_name.rpartition(".")
        parent = named[parent_name]
        prefix = parent_name + "." if parent_name else ""
        routers = [f"{prefix}{child}" for child, m in parent.named_children()
                   if isinstance(m, nn.Linear) and m.out_features == len(experts)]
        if len(routers) != 1:
            continue
        router = routers[0]

        def under(name: str) -> list[str]:
            return [n for n in linears if n.startswith(name + ".")]

        expert_names = {f"{list_name}.{i}": under(f"{list_name}.{i}") for i in range(len(experts))}
        shared, gates = {}, []
        for child, module in parent.named_children():
            name = f"{prefix}{child}"
            if name in (router, list_name):
                continue
            if isinstance(module, nn.Linear):
                gates.append(name)
            elif under(name):
                shared[name] = under(name)
        top_k = next((a for a in TOP_K_ATTRIBUTES if isinstance(getattr(parent, a, None), int)), None)
        return MoEParts(parent_name, parent, router, expert_names, shared, gates, top_k)
    return None
