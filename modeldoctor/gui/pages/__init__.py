"""One page per step of the checkup."""
