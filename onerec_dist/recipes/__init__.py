"""Training recipes, each readable top to bottom: what a stage runs between parsing its config and writing its
summary (onerec_dist/stages/ stay thin)."""
