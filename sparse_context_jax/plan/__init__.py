"""Pod plans: the train step (or the sampler) compiled ahead of time for a TPU topology, from this machine."""
