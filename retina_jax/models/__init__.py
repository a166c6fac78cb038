"""Model towers and the two-tower model."""
