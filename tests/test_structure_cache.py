"""Structural modifications and the KV cache: a duplicated block must not share its cache
slot with the block it copies, and a removed block must not leave the cache shorter than
the text it has seen. Cached generation then agrees with uncached generation, and the model
comes back exactly as it was."""

import pytest
import torch

from conftest import FAMILIES
from modeldoctor.metrics import decoding as decoding_metrics
from modeldoctor.modifications.base import create
from modeldoctor.modifications.decoding import GREEDY
from modeldoctor.session import Session

NEW_TOKENS = 16
PROMPT = list(range(5, 17))


@pytest.fixture(scope="module")
def sessions(model_dirs):
    return {family: Session.open(model_dirs[family]) for family in FAMILIES}


def greedy(model, use_cache: bool) -> list[list[int]]:
    """A batch of a full prompt and a left-padded shorter one: padding makes the model build
    an attention mask sized from the cache, which a hole in the cache gets wrong."""
    ids = torch.tensor([PROMPT, [0, 0, 0] + PROMPT[3:]])
    mask = torch.tensor([[1] * len(PROMPT), [0, 0, 0] + [1] * (len(PROMPT) - 3)])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS,
                             min_new_tokens=NEW_TOKENS, do_sample=False, use_cache=use_cache, pad_token_id=0)
    return out[:, len(PROMPT):].tolist()


def targets_of(session) -> list[list[str]]:
    last = session.anatomy.num_blocks - 1
    return [["0"], [str(last // 2)], [str(last)], ["0", str(last)]]


def state(session):
    return session.weights_digest(), list(session.anatomy.block_list), session.model.config.to_dict()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("action", ["duplicate", "remove"])
def test_cached_generation_equals_uncached_under_structure_change(sessions, family, action):
    session = sessions[family]
    mod = create(action)
    digest, blocks, config = state(session)
    for targets in targets_of(session):
        with mod.applied(session.mod_context(), targets):
            uncached = greedy(session.model, use_cache=False)
            cached = greedy(session.model, use_cache=True)
        assert cached == uncached, f"{action}@{targets}: cached generation drifts from uncached"
        after_digest, after_blocks, after_config = state(session)
        assert after_digest == digest
        assert len(after_blocks) == len(blocks) and all(a is b for a, b in zip(after_blocks, blocks))
        assert after_config == config


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_duplicate_changes_the_generation_it_is_compared_by(sessions, family):
    """The side-by-side text of a probe comes from the cached decoding path; it must be the
    duplicated model's own greedy text, not an artefact of a shared cache slot."""
    session = sessions[family]
    for targets in targets_of(session):
        with create("duplicate").applied(session.mod_context(), targets):
            shown = decoding_metrics.generate(session.model, session.tokenizer, PROMPT, GREEDY, NEW_TOKENS)
            assert shown == greedy(session.model, use_cache=False)[0]
