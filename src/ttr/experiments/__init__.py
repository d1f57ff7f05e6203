"""Runners that print tables and save plots."""
