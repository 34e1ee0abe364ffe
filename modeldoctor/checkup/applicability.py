"""Why a modification leaves blocks out: the plan's notes, said of what the blocks lack
("prune-heads-25 does not apply to the state-space (Mamba) blocks 0, 2: they have no attention
heads."), grouped by the kind of block, so a state-space or hybrid model's plan says before the
run which probes it will not get and why."""

from __future__ import annotations

from modeldoctor.model import Anatomy
from modeldoctor.model.anatomy import is_block_target
from modeldoctor.modifications.base import Modification

NO_ATTENTION_NOTE = ("Attention disruption is not available for remove / duplicate: this model has no attention "
                     "blocks (its blocks are state-space mixers).")
BLOCK_KINDS = {"attention": "attention", "state-space": "state-space (Mamba)", "none": "MLP-only"}


def refusal_notes(mod: Modification, anatomy: Anatomy, refused: list[str]) -> list[str]:
    """One note per (kind of block, missing part) among the `refused` targets that `mod.lacks`
    explains; the others are left out without a note, as before."""
    groups: dict[tuple[str, str], list[int]] = {}
    for target in refused:
        missing = mod.lacks(anatomy, target) if is_block_target(target) else None
        if missing is not None:
            kind = anatomy.blocks[int(target)].kind
            groups.setdefault((kind, missing), []).append(int(target))
    notes = []
    for (kind, missing), blocks in groups.items():
        numbers = ", ".join(map(str, blocks))
        if len(blocks) == 1:
            where, has = f"block {numbers}", "it has"
        else:
            every = " (all of them)" if len(blocks) == anatomy.num_blocks else ""
            where, has = f"blocks {numbers}{every}", "they have"
        notes.append(f"{mod.name} does not apply to the {BLOCK_KINDS[kind]} {where}: {has} no {missing}.")
    return notes
