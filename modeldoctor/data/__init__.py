"""Evaluation and calibration data: built-in text, knowledge probes, user files, self-generated."""

from modeldoctor.data.sources import (
    Batch,
    DataSpec,
    EvalData,
    KnowledgeProbe,
    build_data,
    load_knowledge_probes,
)

__all__ = ["Batch", "DataSpec", "EvalData", "KnowledgeProbe", "build_data", "load_knowledge_probes"]
