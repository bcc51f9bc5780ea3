"""The schedule layer: what both executors share. A plan, the step's operation graph built from it, the
buffer manifest and byte accounting of a plan, and the machine profile the simulator and planner read.
It depends on `models` only; the runtime, the simulator and calibrate build on it, the planner on those."""
