"""`pudding bench`: dense vs routed speed against the FLOP/byte ideal, router overhead and
memory; one module per part of the measurement."""
