"""Analyses of where a direction lives: activation/attribution patching and SAE features."""
