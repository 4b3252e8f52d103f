"""Algorithm glue, one file per family (DESIGN.md "Wave 2"); `rollout.py` holds what the rollout
algorithms share: G sampled completions per prompt in the training layout, with their log-probs."""
