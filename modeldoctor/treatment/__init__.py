"""Treatments: mitigations that stop the bleeding, each measured before and after."""
