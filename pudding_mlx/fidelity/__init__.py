"""`pudding fidelity` and `pudding pareto`: how far skip sets move generated text from dense,
and the speed/quality trade-off of sets and routing policies."""
