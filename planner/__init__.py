"""Plan search: memory accounting per tier, the simulator-scored search, and the capacity report."""
