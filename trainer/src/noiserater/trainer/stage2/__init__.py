"""Stage 2: train fresh denoisers on a noise source, the same way for every method. The training loop
(`training`), the held-out loss and sample-quality metrics (`metrics`)."""
