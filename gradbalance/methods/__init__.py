"""One module per balancing method."""
