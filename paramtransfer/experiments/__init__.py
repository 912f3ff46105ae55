"""Runs, comparisons (methods x learning rates x seeds) and hold-out selection."""
