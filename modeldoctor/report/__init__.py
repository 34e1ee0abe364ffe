"""The results model: what the CLI writes, the app shows, the export reads."""

from modeldoctor.report.results import CheckupReport, ProbeRecord, ProbeSpec

__all__ = ["CheckupReport", "ProbeRecord", "ProbeSpec"]
