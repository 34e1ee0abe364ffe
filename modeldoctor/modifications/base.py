"""Reversible modifications and the registry that names them.

A modification is applied to a list of targets (block indices as "3", or linears as
"3.mlp.down_proj" and "head", the LM head) inside a context manager that restores the model
exactly on exit, also when the body raises or is cancelled.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from modeldoctor.errors import ModelNotRestoredError, PlanError
from modeldoctor.model import Anatomy
from modeldoctor.model.anatomy import HEAD, is_block_target, weight_matrix

SCOPES = ("blocks", "linears", "experts")  # experts: routers, experts and shared experts of MoE blocks


@dataclass
class ModContext:
    """What a modification may need besides the model: its anatomy and calibration statistics."""

    model: torch.nn.Module
    anatomy: Anatomy
    # Linear name -> L2 norm of each input feature over the calibration split (Wanda, AWQ...).
    input_norms: dict[str, torch.Tensor] = field(default_factory=dict)
    # Linear name -> per-weight L2 norm of the LM-loss gradient over calibration batches.
    grad_norms: dict[str, torch.Tensor] = field(default_factory=dict)
    # Linears left untouched (kept in higher precision by a mixed-precision plan).
    keep: frozenset[str] = frozenset()
    # (B, T) mask of the real tokens of the padded batch running now, set with `token_mask`;
    # None outside a batch (e.g. generation, batch 1): then every call's tensor is all real.
    token_mask: torch.Tensor | None = None
    # Block -> the largest size of each (head, channel) of its cached keys and values over the
    # calibration split, computed on first call (per-channel KV-cache scales); None without data.
    kv_ranges: Callable[[], dict] | None = None
    # Block -> tokens per expert of a mixture of experts on the calibration split, computed on
    # first call (drop-least-used fits on it); None without calibration data.
    expert_usage: Callable[[], dict] | None = None


@contextlib.contextmanager
def token_mask(ctx: ModContext, attention_mask: torch.Tensor | None) -> Iterator[None]:
    """Tell the applied modification which positions of the batch about to run are real
    tokens, not right padding: `with token_mask(ctx, batch.attention_mask): run the batch`.
    Modifications that depend on what one runtime call sees (int8 dynamic's activation
    range) read it; padding never reaches a deployed model."""
    previous, ctx.token_mask = ctx.token_mask, attention_mask
    try:
        yield
    finally:
        ctx.token_mask = previous


class Modification:
    """Base class. Subclasses set the class attributes and implement `applied`."""

    family: str = ""  # quantize | prune | structure | decoding
    scopes: tuple[str, ...] = SCOPES
    needs_input_norms: bool = False
    needs_gradients: bool = False
    sweep_strength: float | None = None  # bits or sparsity, for robustness curves
    sweep_group: str | None = None  # modifications on one robustness curve share this
    sweep_harsher_when_lower: bool = False  # fewer bits or a lower rank is harsher; more sparsity is
    # Whether a probe may replay recorded block inputs; a change made before the first block (the
    # rotary position embedding) needs whole forward passes.
    replays: bool = True
    # Whether its whole-model probe also generates through the KV cache (it changes what the cache holds).
    measures_cached_generation: bool = False

    def blocks_it_applies_to(self, anatomy: Anatomy) -> list[str]:
        """The block targets ("3") this modification applies to: a whole-model application."""
        return [str(b.index) for b in anatomy.blocks if self.applies_to(anatomy, str(b.index))]

    def not_applicable_reason(self, anatomy: Anatomy) -> str:
        """Why applies_to is false for this model, in words (for a modification of the whole model)."""
        return "it does not fit this model's structure"

    def describe_strength(self, strength: float) -> str:
        """A sweep strength in words, for robustness findings ("30% sparsity")."""
        return f"{strength:.0%} sparsity"

    def __init__(self, name: str) -> None:
        self.name = name

    def applies_to(self, anatomy: Anatomy, target: str) -> bool:
        # The session collects calibration statistics (input norms, gradients) for the block
        # linears only, so what needs them cannot be applied to the head.
        return target != HEAD or not (self.needs_input_norms or self.needs_gradients)

    def lacks(self, anatomy: Anatomy, target: str) -> str | None:
        """Where `applies_to` refuses a block for want of a part, that part ("attention heads"),
        for the plan's note on why; None leaves the target out without a note."""
        return None

    def applied(self, ctx: ModContext, targets: list[str]) -> contextlib.AbstractContextManager:
        raise NotImplementedError

    def changes_embedding(self, anatomy: Anatomy, target: str) -> bool:
        """Whether applying this to `target` also changes the token embedding (so a probe of it
        cannot reuse the unmodified model's states entering block 0)."""
        return False

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


def target_linears(anatomy: Anatomy, target: str) -> list[str]:
    """A block target expands to all its linears, an expert to its own; a linear target (the
    head too) is itself."""
    if not is_block_target(target):
        return anatomy.expert_linears(target) or [target]
    index = int(target)
    return [f"{index}.{rel}" for rel in anatomy.blocks[index].linears]


class WeightModification(Modification):
    """Rewrites linear weights in place; the originals are copied back on exit."""

    # Whether the export writes a head tied to the embedding in this format as one table that
    # both read (then the probe changes the embedding too); otherwise the head gets a copy.
    shares_tied_table: bool = False

    def new_weight(self, ctx: ModContext, linear: str, weight: torch.Tensor) -> torch.Tensor:
        """Return the modified (out, in) weight as a new tensor; `weight` is the live one (or a
        contiguous copy, for a transposed layout): read it, never write to it (`rewrite` writes the result; the live weight as input spares a
        third copy of the largest linear, the head, next to the saved original and the result)."""
        raise NotImplementedError

    def rewrite(self, ctx: ModContext, linear: str, view: torch.Tensor) -> None:
        """Write the modified weight into `view`, the live (out, in) weight."""
        view.copy_(self.new_weight(ctx, linear, view.detach().contiguous()))

    def linears_for(self, ctx: ModContext, target: str) -> list[str]:
        return target_linears(ctx.anatomy, target)

    def changes_embedding(self, anatomy: Anatomy, target: str) -> bool:
        return self.shares_tied_table and target == HEAD and anatomy.head_tied

    def extra_hooks(self, ctx: ModContext, linear: str, module: torch.nn.Module) -> list:
        return []

    @contextlib.contextmanager
    def applied(self, ctx: ModContext, targets: list[str]) -> Iterator[None]:
        names = [n for t in targets for n in self.linears_for(ctx, t) if n not in ctx.keep]
        with preserved_weights(ctx.anatomy, names, untie_head=not self.shares_tied_table), \
                temporary_hooks() as hooks:
            with torch.no_grad():
                for name in names:
                    module = ctx.anatomy.linear(name)
                    self.rewrite(ctx, name, weight_matrix(module))
                    hooks.extend(self.extra_hooks(ctx, name, module))
            yield


@contextlib.contextmanager
def preserved_weights(anatomy: Anatomy, linears: list[str], untie_head: bool = True) -> Iterator[None]:
    """Copy weights and biases of the named linears, and write them back bit-exact on exit (a
    large one's copy waits in a temporary file: _SavedTensor).

    With `untie_head`, a head tied to the token embedding gets a private copy of the shared
    weight for the duration: an export that quantizes the head's MatMul into its own copy
    leaves the embedding lookup reading fp32 weights, so writing through the shared tensor
    would also change the embedding. On exit the shared parameter itself is put back.
    Without it, changes go through the shared tensor (the export's shared table)."""
    saved = []
    untied = []
    try:
        for name in dict.fromkeys(linears):
            module = anatomy.linear(name)
            if name == HEAD and anatomy.head_tied and untie_head:
                shared = module.weight
                module.weight = torch.nn.Parameter(shared.detach().clone(), requires_grad=shared.requires_grad)
                untied.append((module, shared))
                params = (getattr(module, "bias", None),)
            else:
                params = (module.weight, getattr(module, "bias", None))
            for param in params:
                if param is not None:
                    saved.append((param, _SavedTensor(param.detach())))
        yield
    finally:
        failed = None
        try:
            with torch.no_grad():
                for param, original in saved:
                    try:
                        original.restore(param)
                    except Exception as exc:  # noqa: BLE001 - the others are still put back, then it is raised
                        failed = failed or exc
        finally:
            for _, original in saved:
                original.close()
            for module, shared in untied:
                module.weight = shared
        if isinstance(failed, OSError):
            raise ModelNotRestoredError(f"The original weights could not be read back from their temporary file "
                                f"({failed}); the model in memory is no longer the original: load it again.")
        if failed is not None:
            raise failed


# A saved original larger than this waits in a temporary file (the operating system's page
# cache, which it may write out and reclaim; on a RAM disk this saves nothing), not in the
# process's memory: on a 1.1 B model the LM head's copy was a probe's largest allocation
# (0.24 GiB of a 4.4 GiB model), and a whole-model change of a large model would otherwise hold
# every linear twice.
SAVED_IN_FILE_BYTES = 64 << 20
_FILE_CHUNK_BYTES = 8 << 20


class _SavedTensor:
    """A bit-exact copy of a tensor's values, to write back into it: in memory, or for a large
    tensor on the CPU in an unnamed temporary file (removed when closed; in memory instead when
    the disk lacks the room or the file cannot be written). Written once and read back once as a
    stream, not memory-mapped like ReferenceSpill's tensors (which the probes read again and
    again): mapped pages once written count as the process's own memory until unmapped."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.copy: torch.Tensor | None = None
        self.file = None
        self.shape, self.dtype = tensor.shape, tensor.dtype
        size = tensor.numel() * tensor.element_size()
        if tensor.device.type == "cpu" and tensor.is_contiguous() and size > SAVED_IN_FILE_BYTES \
                and shutil.disk_usage(tempfile.gettempdir()).free > 2 * size:
            try:
                self.file = tempfile.TemporaryFile(prefix="modeldoctor-original-")
                self.file.write(memoryview(_as_bytes(tensor).numpy()))
                self.file.flush()
                return
            except OSError:
                self.close()
        self.copy = tensor.clone()

    def close(self) -> None:
        """Remove the file, if any (a flush that fails here has nothing left to lose)."""
        if self.file is not None:
            with contextlib.suppress(OSError):
                self.file.close()
            self.file = None

    def restore(self, param: torch.Tensor) -> None:
        """Write the saved values back into `param` (a chunk at a time from the file)."""
        if self.copy is not None:
            param.copy_(self.copy)
            return
        live = param.detach()
        whole = None
        if not (live.is_contiguous() and live.shape == self.shape and live.dtype == self.dtype):
            whole = torch.empty(self.shape, dtype=self.dtype)  # read whole, then copied as copy_ would
        target = _as_bytes(live if whole is None else whole)
        try:
            self.file.seek(0)
            buffer = bytearray(_FILE_CHUNK_BYTES)
            for start in range(0, target.numel(), _FILE_CHUNK_BYTES):
                count = self.file.readinto(buffer)
                if count != min(_FILE_CHUNK_BYTES, target.numel() - start):
                    raise OSError("the saved weights file was cut short")
                target[start:start + count].copy_(torch.frombuffer(buffer, dtype=torch.uint8, count=count))
        finally:
            self.close()
        if whole is not None:
            param.copy_(whole)


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's storage as a flat uint8 view (any dtype, bfloat16 included)."""
    return tensor.reshape(-1).view(torch.uint8)


@contextlib.contextmanager
def temporary_hooks() -> Iterator[list]:
    """Collect hook handles in the yielded list; every one is removed on exit."""
    handles: list = []
    try:
        yield handles
    finally:
        for handle in handles:
            handle.remove()


# ---- registry ----------------------------------------------------------------------------

@dataclass(frozen=True)
class RegisteredFamily:
    pattern: re.Pattern
    factory: Callable[[re.Match], Modification]
    summary: str
    examples: tuple[str, ...]


_REGISTRY: list[RegisteredFamily] = []
PRESETS: dict[str, tuple[str, ...]] = {
    "bits-sweep": ("int8", "int6", "int4", "int3", "int2"),
    "sparsity-sweep": tuple(f"prune-wanda-{p}" for p in (10, 30, 50, 70, 90)),
    "rank-sweep": tuple(f"svd-r{p}" for p in (90, 75, 50, 25, 10)),
}


def register(pattern: str, summary: str, examples: tuple[str, ...]):
    """Decorator: `factory(match) -> Modification` handles names matching `pattern`."""
    def wrap(factory):
        _REGISTRY.append(RegisteredFamily(re.compile(rf"^{pattern}$"), factory, summary, examples))
        return factory
    return wrap


def create(name: str) -> Modification:
    _load_builtin_families()
    for family in _REGISTRY:
        match = family.pattern.match(name)
        if match:
            return family.factory(match)
    raise PlanError(f"Unknown modification '{name}'. Known: {', '.join(example_names())}.")


def expand(names: list[str]) -> list[str]:
    """Expand presets such as bits-sweep, keep order, drop repeats."""
    out: list[str] = []
    for name in names:
        out.extend(PRESETS.get(name, (name,)))
    return list(dict.fromkeys(out))


def families() -> list[RegisteredFamily]:
    _load_builtin_families()
    return list(_REGISTRY)


def example_names() -> list[str]:
    return [e for f in families() for e in f.examples] + list(PRESETS)


def _load_builtin_families() -> None:
    # Importing the modules registers their families (one file per family).
    from modeldoctor.modifications import (  # noqa: F401
        decoding, kvcache, lowrank, prune, quantize, rope, routing, structure,
    )


class Unchanged(Modification):
    """The model as it is: the baseline that treatments measure a treated model with."""

    family = "none"

    @contextlib.contextmanager
    def applied(self, ctx: ModContext, targets: list[str]) -> Iterator[None]:
        yield


@register(r"none", "no change: the model as it is (the baseline for a treated model)", ("none",))
def _unchanged(match):
    return Unchanged(match[0])
