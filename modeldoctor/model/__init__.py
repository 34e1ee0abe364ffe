"""Loading models safely and finding their anatomy."""

from modeldoctor.model.anatomy import Anatomy, BlockParts, find_anatomy
from modeldoctor.model.loading import LoadedModel, load_model

__all__ = ["Anatomy", "BlockParts", "LoadedModel", "find_anatomy", "load_model"]
