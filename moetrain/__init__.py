"""moetrain: end-to-end Mixture-of-Experts training."""

__version__ = "0.1.0"
