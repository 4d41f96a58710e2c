"""`pudding eval` and `pudding eval-compare`: zero-shot accuracy of skip sets and routing
methods, the log-likelihood scorer and the lm-evaluation-harness adapter."""
