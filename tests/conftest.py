import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import CONFIGS, save_model  # noqa: E402

FAMILIES = sorted(CONFIGS)


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {family: save_model(family, root / family) for family in FAMILIES}


@pytest.fixture(scope="session")
def llama_dir(model_dirs):
    return model_dirs["llama"]


@pytest.fixture()
def llama_session(llama_dir):
    from modeldoctor.session import Session

    return Session.open(llama_dir)


@pytest.fixture()
def small_data_spec():
    from modeldoctor.data import DataSpec

    return DataSpec(tokens=192, seq_len=64, calibration_tokens=128, selection_tokens=128, batch_size=2)


@pytest.fixture(scope="session")
def moe_dirs(tmp_path_factory):
    """Tiny random mixtures of experts (tiny_models.MOE_CONFIGS), one folder per family."""
    from tiny_models import MOE_CONFIGS

    root = tmp_path_factory.mktemp("moe_models")
    return {family: save_model(family, root / family) for family in sorted(MOE_CONFIGS)}
