"""The training runtime: configuration, the iteration, the loop and the run folder."""
