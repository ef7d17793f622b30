"""Figures as data (spec), and their matplotlib rendering."""
