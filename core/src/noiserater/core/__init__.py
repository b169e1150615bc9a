"""NoiseRater core: the code that both sides of the wire must share, so they cannot drift apart.

- `noiserater.core.v1`, `noiserater.core.inference`: generated messages and stubs of the `noiserater.v1` API
  and the KServe v2 subset (from the contract in the repository's proto/ folder).
- `noiserater.core.codec`: Tensor <-> numpy / torch.
- `noiserater.core.selection`: `Rule` and `SelectionPlan`, the one selection pipeline (candidates -> triples,
  scores -> chosen indices) that the in-process selector, the server and stage 2 all run.
- `noiserater.core.scoring`: the rater's ONNX signature and metadata keys, and `RaterSession` (onnxruntime).
- `noiserater.core.repository`: the model repository's layout and name checks.

Nothing here imports torch: the server image has no torch.
"""
