"""Comparisons of models with honest error margins: paired bootstrap intervals of metric differences."""
