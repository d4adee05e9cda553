"""metadist: distributed meta-learning (MAML, FOMAML, Reptile, ANIL, Meta-SGD, MAML++) on Ray."""

__version__ = "0.1.0"
