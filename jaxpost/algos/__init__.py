"""Algorithm glue, one file per family (DESIGN.md "Wave 2"), each registering its algorithms:
`preference.py` ("dpo", "kto", "rm"; `ref_cache.py`: DPO's precomputed reference log-probs).
`rollout.py` holds what the rollout algorithms share: G sampled completions per prompt in the
training layout, with their log-probs."""
