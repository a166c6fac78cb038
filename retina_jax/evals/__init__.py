"""Evaluations: the evaluator interface and registry (base.py), the in-training evaluators on the
held-out corpora (evaluators.py) and the task-based transfer evaluators (suite.py); docs/architecture.md,
"Evaluators"."""
from retina_jax.evals.base import active, build, check

__all__ = ["active", "build", "check"]
