"""Discrete-event simulator of one training step: the runtime's operation graph replayed with a profile's costs."""

from .costs import ProfileError
from .simulate import RESOURCE_NAMES, Simulation, Span, simulate

__all__ = ["ProfileError", "RESOURCE_NAMES", "Simulation", "Span", "simulate"]
