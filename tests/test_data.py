import pytest
import torch

from modeldoctor.data import DataSpec, build_data, load_knowledge_probes
from modeldoctor.data.sources import read_documents
from modeldoctor.errors import DataError, ModelDoctorError


def test_builtin_splits_are_disjoint_and_sized(llama_session):
    data = build_data(llama_session.model, llama_session.tokenizer, DataSpec(tokens=512, seq_len=128,
                                                                             calibration_tokens=256))
    assert data.eval_tokens == 512 and data.calibration_tokens == 256
    eval_text = {tuple(row.tolist()) for b in data.eval_batches for row in b.input_ids}
    calib_text = {tuple(row.tolist()) for b in data.calibration_batches for row in b.input_ids}
    assert not eval_text & calib_text


def test_knowledge_probes_are_many_and_scored_on_answers(llama_session):
    """Each row's scored positions predict exactly the text of its own probe's answer, right
    after that probe's question: read back by decoding the tokens, not by the batcher's indices."""
    probes = load_knowledge_probes()
    assert len(probes) >= 200 and len({p.topic for p in probes}) >= 6
    tokenizer = llama_session.tokenizer
    data = build_data(llama_session.model, tokenizer, DataSpec(tokens=64, seq_len=64))
    seen = []
    for batch in data.knowledge_batches:
        for row, (positions, answer) in enumerate(zip(batch.answer_positions, batch.answer_tokens)):
            probe = probes[batch.probe_indices[row]]
            seen.append(batch.probe_indices[row])
            ids = batch.input_ids[row].tolist()
            # A prediction at position p is of token p + 1: the answer's tokens, in order, without a gap.
            assert positions == list(range(positions[0], positions[0] + len(answer)))
            assert ids[positions[0] + 1:positions[-1] + 2] == answer
            assert tokenizer.decode(answer).strip() == probe.answer
            assert tokenizer.decode(ids[:positions[0] + 1]).strip().endswith(probe.prompt)
            assert batch.attention_mask[row, :positions[-1] + 2].all()  # all of it real text, no padding
    assert sorted(seen) == list(range(len(probes)))  # every probe scored exactly once


def test_self_generated_is_deterministic(llama_session):
    spec = DataSpec(source="self", tokens=64, seq_len=32, calibration_tokens=32, knowledge=False)
    first = build_data(llama_session.model, llama_session.tokenizer, spec)
    second = build_data(llama_session.model, llama_session.tokenizer, spec)
    assert all((a.input_ids == b.input_ids).all() for a, b in zip(first.eval_batches, second.eval_batches))
    assert not (first.eval_batches[0].input_ids == first.calibration_batches[0].input_ids).all()


def test_user_files(tmp_path, llama_session):
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text('{"text": "first document here"}\n\n{"text": "second one"}\n', encoding="utf-8")
    assert read_documents(jsonl) == ["first document here", "second one"]
    jsonl.write_text('{"body": "x"}\n', encoding="utf-8")
    with pytest.raises(DataError, match='no "text" field'):
        read_documents(jsonl)
    short = tmp_path / "short.txt"
    short.write_text("Hi.", encoding="utf-8")
    with pytest.raises(DataError, match="too little text"):
        build_data(llama_session.model, llama_session.tokenizer, DataSpec(source=str(short)))


def _rows(batches):
    return [row[mask.bool()].tolist() for b in batches for row, mask in zip(b.input_ids, b.attention_mask)]


def test_three_disjoint_splits_of_the_builtin_text(llama_session):
    data = build_data(llama_session.model, llama_session.tokenizer,
                      DataSpec(tokens=512, seq_len=128, calibration_tokens=256, selection_tokens=256))
    assert (data.eval_tokens, data.selection_tokens, data.calibration_tokens) == (512, 256, 256)
    splits = [set(map(tuple, _rows(b))) for b in (data.eval_batches, data.selection_batches,
                                                   data.calibration_batches)]
    assert not (splits[0] & splits[1] or splits[0] & splits[2] or splits[1] & splits[2])
    assert data.describe()["selection_tokens"] == 256
    # Measured through the selection view, a figure is on the selection text, and a fit made
    # through it is the fit made on the calibration text.
    view = data.selection_view()
    assert set(map(tuple, _rows(view.eval_batches))) == splits[1]
    assert set(map(tuple, _rows(view.calibration_batches))) == splits[2]
    from modeldoctor.session import Session

    through_view, direct = llama_session.input_norms(view), Session(llama_session.loaded).input_norms(data)
    assert through_view.keys() == direct.keys() and all(torch.equal(through_view[n], direct[n]) for n in direct)


def test_a_one_document_text_is_split_by_position(tmp_path, llama_session):
    """One document used to leave calibration empty, and fits silently fell back to the
    evaluation text. Now the document is cut into three splits, and the data says so."""
    one = tmp_path / "one.txt"
    one.write_text(" ".join(f"word{i}" for i in range(300)), encoding="utf-8")
    data = build_data(llama_session.model, llama_session.tokenizer,
                      DataSpec(source=str(one), tokens=4096, seq_len=128, calibration_tokens=256,
                               selection_tokens=256))
    assert data.calibration_tokens == 256 and data.selection_tokens == 256
    stream = [t for row in _rows(data.eval_batches) for t in row]
    calibration = [t for row in _rows(data.calibration_batches) for t in row]
    selection = [t for row in _rows(data.selection_batches) for t in row]
    total = len(stream) + len(calibration) + len(selection)
    assert total <= len(llama_session.tokenizer(one.read_text(), add_special_tokens=False)["input_ids"]) + 1
    assert any("cut by token" in note for note in data.notes)


def test_fits_refuse_a_text_without_calibration_tokens(tmp_path, llama_session):
    """Too little text for a calibration split: Wanda (a fit) refuses instead of fitting on
    the evaluation text."""
    from modeldoctor.checkup.plan import CheckupPlan
    from modeldoctor.checkup.run import checkup

    short = tmp_path / "short.txt"
    short.write_text("A short text that is only long enough for evaluation, nothing more.", encoding="utf-8")
    data = build_data(llama_session.model, llama_session.tokenizer,
                      DataSpec(source=str(short), tokens=64, seq_len=32, knowledge=False))
    assert data.calibration_tokens < 32
    with pytest.raises(ModelDoctorError, match="calibration tokens are needed"):
        checkup(llama_session, CheckupPlan(modifications=["prune-wanda-50"], knowledge=False), data)
