import pytest
import torch

from conftest import FAMILIES
from modeldoctor.model.anatomy import weight_matrix
from modeldoctor.session import Session


@pytest.mark.parametrize("family", FAMILIES)
def test_anatomy_found_generically(model_dirs, family):
    session = Session.open(model_dirs[family])
    anatomy = session.anatomy
    assert anatomy.num_blocks == 3
    for part in anatomy.blocks:
        assert part.attention_out is not None and part.mlp_down is not None
        out = weight_matrix(part.linears[part.mlp_down])
        assert out.shape[0] == anatomy.hidden_size  # the down projection writes the residual stream
        assert weight_matrix(part.linears[part.attention_out]).shape[0] == anatomy.hidden_size
    assert len(anatomy.tail) == 1  # the final norm, found by run order
    assert "norm" in type(anatomy.tail[0]).__name__.lower()
    assert anatomy.head is session.model.get_output_embeddings()


@pytest.mark.parametrize("family", FAMILIES)
def test_replay_from_every_block_matches_full_forward(model_dirs, family):
    session = Session.open(model_dirs[family])
    ids = torch.randint(3, 300, (2, 24))
    from modeldoctor.data import Batch

    trace, logits = session.replayer.trace(Batch(ids, torch.ones_like(ids)))
    for start in range(session.anatomy.num_blocks):
        replayed = session.replayer.run_from(trace, start).logits
        torch.testing.assert_close(replayed, logits, rtol=1e-5, atol=1e-5)
