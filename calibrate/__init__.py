"""Machine calibration: copy, disk, optimizer and kernel rates written to a profile (JSON)."""
