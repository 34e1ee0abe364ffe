"""The checkup: plan what to probe, run the probes, judge which layers bleed."""
