"""Pure adapter math: weight deltas of each algorithm, no modules and no state."""
