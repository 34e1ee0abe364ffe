"""Deterministic token batches for evaluation and calibration, kept in separate splits.

Documents are split before tokenizing: evaluation takes documents from the front of the
source, calibration from the back, and no document feeds both.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from modeldoctor.errors import DataError
from modeldoctor.resources import resource

MIN_TOKENS = 32
SOURCES = ("builtin", "self")


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) long
    attention_mask: torch.Tensor  # (B, T) long; right padding only
    # Knowledge batches: positions whose prediction must match, and the expected tokens.
    answer_positions: list[list[int]] = field(default_factory=list)
    answer_tokens: list[list[int]] = field(default_factory=list)
    probe_indices: list[int] = field(default_factory=list)  # which probe each row is

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


@dataclass(frozen=True)
class KnowledgeProbe:
    topic: str
    prompt: str
    answer: str


@dataclass(frozen=True)
class DataSpec:
    source: str = "builtin"  # builtin | self | path to a .txt / .jsonl file
    tokens: int = 1024  # evaluation budget
    seq_len: int = 256
    calibration_tokens: int = 512
    batch_size: int = 4
    knowledge: bool = True  # also score the knowledge probes
    seed: int = 0
    split: str = "eval"  # "calibration" for the view whose evaluation batches are the calibration split

    def describe(self) -> str:
        return f"{self.source}: {self.tokens} eval tokens in sequences of {self.seq_len}"


@dataclass
class EvalData:
    spec: DataSpec
    eval_batches: list[Batch]
    calibration_batches: list[Batch]
    knowledge_batches: list[Batch]
    knowledge_probes: list[KnowledgeProbe]
    notes: list[str] = field(default_factory=list)

    def calibration_view(self) -> "EvalData":
        """The calibration split seen as evaluation data: treatments fit on it, never on eval."""
        from dataclasses import replace

        return EvalData(replace(self.spec, split="calibration", knowledge=False), self.calibration_batches, [],
                        [], [], list(self.notes))

    @property
    def eval_tokens(self) -> int:
        return sum(b.num_tokens for b in self.eval_batches)

    @property
    def calibration_tokens(self) -> int:
        return sum(b.num_tokens for b in self.calibration_batches)

    def describe(self) -> dict:
        return {
            "source": self.spec.source, "seq_len": self.spec.seq_len, "seed": self.spec.seed,
            "eval_tokens": self.eval_tokens, "calibration_tokens": self.calibration_tokens,
            "knowledge_probes": len(self.knowledge_probes), "notes": list(self.notes),
        }


def read_documents(path: str | Path) -> list[str]:
    """Documents from a .txt (blank-line separated paragraphs) or .jsonl (a "text" field)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"No text file at {path}.")
    try:
        raw = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path.name} is not UTF-8 text (bad byte at position {exc.start}); save it as UTF-8."
        ) from None
    if path.suffix.lower() == ".jsonl":
        docs = []
        for number, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise DataError(f"{path.name} line {number} is not valid JSON.") from None
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise DataError(f'{path.name} line {number} has no "text" field with a string.')
            docs.append(text)
    else:
        docs = [p.strip() for p in raw.replace("\r\n", "\n").split("\n\n")]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise DataError(f"{path.name} contains no text.")
    return docs


def load_knowledge_probes() -> list[KnowledgeProbe]:
    with open(resource("data", "knowledge_probes.tsv"), encoding="utf-8", newline="") as handle:
        rows = csv.DictReader(handle, delimiter="\t")
        return [KnowledgeProbe(r["topic"], r["prompt"], r["answer"]) for r in rows]


def _chunk(stream: list[int], budget: int, seq_len: int) -> list[list[int]]:
    stream = stream[:budget]
    return [stream[i:i + seq_len] for i in range(0, len(stream), seq_len) if len(stream[i:i + seq_len]) >= 2]


def _batches(sequences: list[list[int]], batch_size: int, pad_id: int) -> list[Batch]:
    batches = []
    for start in range(0, len(sequences), batch_size):
        group = sequences[start:start + batch_size]
        width = max(len(s) for s in group)
        ids = torch.full((len(group), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for row, seq in enumerate(group):
            ids[row, :len(seq)] = torch.tensor(seq)
            mask[row, :len(seq)] = 1
        batches.append(Batch(ids, mask))
    return batches


def _pad_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


def _stream(tokenizer, docs: list[str]) -> list[int]:
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    for doc in docs:
        stream += tokenizer(doc, add_special_tokens=False)["input_ids"] + separator
    return stream


def split_documents(tokenizer, docs: list[str], eval_tokens: int, calib_tokens: int) -> tuple[list[int], list[int], list[str]]:
    """Evaluation stream from the front documents, calibration from the back, disjoint."""
    notes = []
    lengths = [len(tokenizer(d, add_special_tokens=False)["input_ids"]) + 1 for d in docs]
    eval_docs, used = [], 0
    for doc, length in zip(docs, lengths):
        if used >= eval_tokens and eval_docs:
            break
        eval_docs.append(doc)
        used += length
    rest = docs[len(eval_docs):]
    if not rest and len(eval_docs) > 1:
        rest = [eval_docs.pop()]  # always keep calibration data apart from evaluation data
        notes.append("The text is short: evaluation got fewer tokens so calibration has its own.")
    eval_stream = _stream(tokenizer, eval_docs)
    calib_stream = _stream(tokenizer, list(reversed(rest)))[:calib_tokens]
    if len(eval_stream) < eval_tokens:
        notes.append(f"Only {len(eval_stream)} evaluation tokens were available (asked for {eval_tokens}).")
    return eval_stream, calib_stream, notes


def knowledge_batches(tokenizer, probes: list[KnowledgeProbe], batch_size: int = 32) -> list[Batch]:
    """Prompt + answer sequences; the answer's tokens are what the model must predict."""
    pad = _pad_id(tokenizer)
    items = []
    for index, probe in enumerate(probes):
        prompt_ids = tokenizer(probe.prompt)["input_ids"]
        full_ids = tokenizer(probe.prompt + " " + probe.answer)["input_ids"]
        if full_ids[:len(prompt_ids)] != prompt_ids:  # merged across the boundary
            full_ids = prompt_ids + tokenizer(" " + probe.answer, add_special_tokens=False)["input_ids"]
        answer = full_ids[len(prompt_ids):]
        items.append((full_ids, list(range(len(prompt_ids) - 1, len(full_ids) - 1)), answer, index))
    items.sort(key=lambda item: len(item[0]))  # similar lengths together: little padding
    batches = []
    for start in range(0, len(items), batch_size):
        group = items[start:start + batch_size]
        batch = _batches([g[0] for g in group], len(group), pad)[0]
        batch.answer_positions = [g[1] for g in group]
        batch.answer_tokens = [g[2] for g in group]
        batch.probe_indices = [g[3] for g in group]
        batches.append(batch)
    return batches


def self_generated(model, tokenizer, tokens: int, seq_len: int, seed: int) -> list[list[int]]:
    """Text sampled from the unmodified model itself (temperature 1), reproducibly."""
    count = max(1, -(-tokens // seq_len))
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise DataError("The tokenizer has neither a BOS nor an EOS token to start generation from.")
    prompt = torch.full((count, 1), int(start), dtype=torch.long)
    with torch.random.fork_rng(devices=[]), torch.inference_mode():
        torch.manual_seed(seed)
        out = model.generate(
            prompt, attention_mask=torch.ones_like(prompt), do_sample=True, temperature=1.0, top_k=0,
            top_p=1.0, max_new_tokens=seq_len - 1, min_new_tokens=seq_len - 1,
            pad_token_id=_pad_id(tokenizer),
        )
    return [row.tolist() for row in out]


def build_data(model, tokenizer, spec: DataSpec) -> EvalData:
    if spec.tokens < MIN_TOKENS:
        raise DataError(f"The token budget must be at least {MIN_TOKENS} tokens (got {spec.tokens}).")
    if spec.seq_len < 8:
        raise DataError("Sequences must be at least 8 tokens long.")
    pad = _pad_id(tokenizer)
    notes: list[str] = []
    if spec.source == "self":
        eval_seqs = self_generated(model, tokenizer, spec.tokens, spec.seq_len, spec.seed)
        calib_seqs = self_generated(model, tokenizer, spec.calibration_tokens, spec.seq_len, spec.seed + 1)
        eval_seqs = _chunk([t for s in eval_seqs for t in s], spec.tokens, spec.seq_len)
        calib_seqs = _chunk([t for s in calib_seqs for t in s], spec.calibration_tokens, spec.seq_len)
    else:
        if spec.source == "builtin":
            docs = read_documents(resource("data", "general_text.txt"))
        else:
            docs = read_documents(spec.source)
        eval_stream, calib_stream, notes = split_documents(tokenizer, docs, spec.tokens, spec.calibration_tokens)
        eval_seqs = _chunk(eval_stream, spec.tokens, spec.seq_len)
        calib_seqs = _chunk(calib_stream, spec.calibration_tokens, spec.seq_len)
        if sum(len(s) for s in eval_seqs) < MIN_TOKENS:
            raise DataError(
                f"{Path(spec.source).name if spec.source != 'builtin' else 'The built-in text'} has too "
                f"little text: at least {MIN_TOKENS} tokens are needed."
            )
    probes = load_knowledge_probes() if spec.knowledge else []
    return EvalData(
        spec=spec,
        eval_batches=_batches(eval_seqs, spec.batch_size, pad),
        calibration_batches=_batches(calib_seqs, spec.batch_size, pad),
        knowledge_batches=knowledge_batches(tokenizer, probes) if probes else [],
        knowledge_probes=probes,
        notes=notes,
    )
