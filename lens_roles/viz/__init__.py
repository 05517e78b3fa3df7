"""Figures: tidy frames in, plotly figures out (the only importer of plotly)."""
