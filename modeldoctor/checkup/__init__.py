"""The checkup: plan what to probe, run the probes, judge which layers bleed."""

# Knowledge probes are scored on this many of each modification's worst bleeding probes by default
# (here, not in plan.py, so that the CLI's help needs no torch).
KNOWLEDGE_TOP = 3
