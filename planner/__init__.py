"""Plan search and fit checks. Today: memory accounting of a plan; the simulator-scored search is issue 3."""
