"""Evaluation: held-out loss, task metrics, generation and the pass@1 sandbox."""
