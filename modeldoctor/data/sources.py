"""Deterministic token batches in three disjoint splits of the text.

- evaluation: every reported figure (documents from the front of the source);
- selection: every choice (roll-back, keep lists, best method, prompt or temperature);
- calibration: every fit (activation norms, gradients, scales, a temperature).

Documents are split before tokenizing: calibration takes documents from the back, selection
the ones before those, and no document feeds two splits. A text with too few documents is
split by token position instead (and says so), so no split ever borrows another's tokens.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass, field, replace
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
    selection_tokens: int = 512
    batch_size: int = 4
    knowledge: bool = True  # also score the knowledge probes
    seed: int = 0
    split: str = "eval"  # "calibration" / "selection": a view whose evaluation batches are that split

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
    selection_batches: list[Batch] = field(default_factory=list)

    def calibration_view(self) -> "EvalData":
        """The calibration split seen as evaluation data (a treatment measuring its own fit)."""
        return self._view("calibration", self.calibration_batches)

    def selection_view(self) -> "EvalData":
        """The selection split seen as evaluation data: choices are measured on it, never on eval."""
        return self._view("selection", self.selection_batches)

    def _view(self, split: str, batches: list[Batch]) -> "EvalData":
        # The calibration split stays the calibration split: a fit made through any view is
        # the same fit (and is cached once, see `calibration_key`).
        return EvalData(replace(self.spec, split=split, knowledge=False), batches, self.calibration_batches,
                        [], [], list(self.notes), self.selection_batches)

    @property
    def calibration_key(self) -> "DataSpec":
        """What identifies the calibration split, whichever view of the data asks."""
        return replace(self.spec, split="eval", knowledge=False)

    def require_calibration(self, purpose: str, minimum: int = MIN_TOKENS) -> None:
        self._require(purpose, "calibration", self.calibration_tokens, "the evaluation text", minimum)

    def require_selection(self, purpose: str, minimum: int = MIN_TOKENS) -> None:
        self._require(purpose, "selection", self.selection_tokens, "the evaluation and calibration text", minimum)

    @staticmethod
    def _require(purpose: str, split: str, have: int, apart_from: str, minimum: int) -> None:
        if have < minimum:
            raise DataError(
                f"{purpose}: at least {minimum} {split} tokens are needed apart from {apart_from}, and this "
                f"text leaves {have}. Choose fewer evaluation tokens or a longer text.")

    @property
    def eval_tokens(self) -> int:
        return sum(b.num_tokens for b in self.eval_batches)

    @property
    def calibration_tokens(self) -> int:
        return sum(b.num_tokens for b in self.calibration_batches)

    @property
    def selection_tokens(self) -> int:
        return sum(b.num_tokens for b in self.selection_batches)

    def describe(self) -> dict:
        return {
            "source": self.spec.source, "seq_len": self.spec.seq_len, "seed": self.spec.seed,
            "split": {"eval": "evaluation"}.get(self.spec.split, self.spec.split),
            "eval_tokens": self.eval_tokens, "calibration_tokens": self.calibration_tokens,
            "selection_tokens": self.selection_tokens,
            "knowledge_probes": len(self.knowledge_probes), "notes": list(self.notes),
            "spec": asdict(self.spec),  # enough to rebuild the same data (resuming a checkup)
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


@dataclass
class Splits:
    evaluation: list[int]
    selection: list[int]
    calibration: list[int]
    notes: list[str]


def split_documents(tokenizer, docs: list[str], eval_tokens: int, calib_tokens: int,
                    selection_tokens: int = 0) -> Splits:
    """Evaluation from the front documents, calibration from the back, selection from the
    documents before calibration's: disjoint by document. With fewer than three documents
    the token stream is cut by position instead (evaluation, then selection, then calibration)."""
    notes: list[str] = []
    wanted = 1 + (calib_tokens > 0) + (selection_tokens > 0)
    if len(docs) < wanted:
        return _split_by_position(_stream(tokenizer, docs), eval_tokens, calib_tokens, selection_tokens)
    lengths = [len(tokenizer(d, add_special_tokens=False)["input_ids"]) + 1 for d in docs]
    eval_count, used = 0, 0
    while eval_count < len(docs) and (used < eval_tokens or eval_count == 0):
        used += lengths[eval_count]
        eval_count += 1
    if len(docs) - eval_count < wanted - 1:
        eval_count = len(docs) - (wanted - 1)  # every split keeps documents of its own
        notes.append("The text is short: evaluation got fewer tokens so calibration and selection have their own.")
    rest = list(range(eval_count, len(docs)))[::-1]  # from the back

    def take(budget: int, keep_for_later: int) -> list[int]:
        taken, got = [], 0
        while rest and len(rest) > keep_for_later and (got < budget or not taken):
            index = rest.pop(0)
            taken.append(index)
            got += lengths[index]
        return taken

    calib_docs = take(calib_tokens, 1 if selection_tokens > 0 else 0) if calib_tokens > 0 else []
    selection_docs = take(selection_tokens, 0) if selection_tokens > 0 else []
    eval_stream = _stream(tokenizer, docs[:eval_count])
    calib_stream = _stream(tokenizer, [docs[i] for i in calib_docs])[:calib_tokens]
    selection_stream = _stream(tokenizer, [docs[i] for i in selection_docs])[:selection_tokens]
    if len(eval_stream) < eval_tokens:
        notes.append(f"Only {len(eval_stream)} evaluation tokens were available (asked for {eval_tokens}).")
    return Splits(eval_stream, selection_stream, calib_stream, notes)


def _split_by_position(stream: list[int], eval_tokens: int, calib_tokens: int, selection_tokens: int) -> Splits:
    """One or two documents: cut the token stream into the three splits. Calibration and
    selection get at most a quarter of the text each, evaluation the rest (up to its budget)."""
    total = len(stream)
    calib = min(calib_tokens, total // 4)
    selection = min(selection_tokens, total // 4)
    evaluation = min(eval_tokens, total - calib - selection)
    notes = ["The text has too few documents to keep the splits in separate documents, so it is cut by token "
             f"position: {evaluation} evaluation, {selection} selection and {calib} calibration tokens."]
    if evaluation < eval_tokens:
        notes.append(f"Only {evaluation} evaluation tokens were available (asked for {eval_tokens}).")
    return Splits(stream[:evaluation], stream[total - calib - selection:total - calib], stream[total - calib:],
                  notes)


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
        def generated(tokens: int, seed: int) -> list[list[int]]:
            if tokens <= 0:
                return []
            rows = self_generated(model, tokenizer, tokens, spec.seq_len, seed)
            return _chunk([t for row in rows for t in row], tokens, spec.seq_len)

        eval_seqs = generated(spec.tokens, spec.seed)
        calib_seqs = generated(spec.calibration_tokens, spec.seed + 1)
        selection_seqs = generated(spec.selection_tokens, spec.seed + 2)
    else:
        if spec.source == "builtin":
            docs = read_documents(resource("data", "general_text.txt"))
        else:
            docs = read_documents(spec.source)
        splits = split_documents(tokenizer, docs, spec.tokens, spec.calibration_tokens, spec.selection_tokens)
        notes = splits.notes
        eval_seqs = _chunk(splits.evaluation, spec.tokens, spec.seq_len)
        calib_seqs = _chunk(splits.calibration, spec.calibration_tokens, spec.seq_len)
        selection_seqs = _chunk(splits.selection, spec.selection_tokens, spec.seq_len)
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
        selection_batches=_batches(selection_seqs, spec.batch_size, pad),
    )
