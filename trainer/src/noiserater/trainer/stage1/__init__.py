"""Stage 1: meta-learn the noise rater. The rater networks (`rater`), the meta-gradient through a virtual
inner step (`meta`), the training run with its population of inner models (`train`), the ONNX export with a
parity check (`export`) and the cost measurement of one meta step (`meta_cost`)."""
