"""Recipes: whole jobs assembled from the components (fine-tuning, the demo)."""
