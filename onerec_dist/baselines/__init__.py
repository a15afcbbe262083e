"""Recommendation baselines trained and evaluated on the project's split and metrics (SASRec)."""
