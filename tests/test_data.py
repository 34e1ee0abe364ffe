import pytest

from modeldoctor.data import DataSpec, build_data, load_knowledge_probes
from modeldoctor.data.sources import read_documents
from modeldoctor.errors import DataError


def test_builtin_splits_are_disjoint_and_sized(llama_session):
    data = build_data(llama_session.model, llama_session.tokenizer, DataSpec(tokens=512, seq_len=128,
                                                                             calibration_tokens=256))
    assert data.eval_tokens == 512 and data.calibration_tokens == 256
    eval_text = {tuple(row.tolist()) for b in data.eval_batches for row in b.input_ids}
    calib_text = {tuple(row.tolist()) for b in data.calibration_batches for row in b.input_ids}
    assert not eval_text & calib_text


def test_knowledge_probes_are_many_and_scored_on_answers(llama_session):
    probes = load_knowledge_probes()
    assert len(probes) >= 200 and len({p.topic for p in probes}) >= 6
    data = build_data(llama_session.model, llama_session.tokenizer, DataSpec(tokens=64, seq_len=64))
    batch = data.knowledge_batches[0]
    for row, (positions, answer) in enumerate(zip(batch.answer_positions, batch.answer_tokens)):
        assert [int(batch.input_ids[row, p + 1]) for p in positions] == answer


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
