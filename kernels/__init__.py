"""Triton kernels for the runtime's bottlenecks (issue 4)."""
