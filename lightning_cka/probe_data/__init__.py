"""Probe data: minibatches from what users pass, the monitor's fixed sample, and the command line's image sources."""
