"""Gradient alignment: Reptile meta-updates (efficient MER) and the gradient-alignment probe."""
