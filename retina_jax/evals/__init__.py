"""Transfer evaluations."""
