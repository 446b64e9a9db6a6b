"""Evaluation: tasks generated locally from installed data, scored on real models."""
