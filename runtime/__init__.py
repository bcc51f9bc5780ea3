"""The sliding-window runtime: executes a Plan's operation graph."""

from .engine import AdamWConfig, Engine, StepResult

__all__ = ["AdamWConfig", "Engine", "StepResult"]
