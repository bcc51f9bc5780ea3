"""Discrete-event simulation of a step's operation graph (issue 3)."""
