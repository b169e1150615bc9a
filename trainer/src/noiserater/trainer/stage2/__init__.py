"""Stage 2: train fresh denoisers on a noise source, the same way for every method. The rater as registered
noise sources (`sources`), research variants as wrappers around any source (`variants`), the training loop
(`training`) and its held-out loss and sample-quality metrics (`metrics`)."""
