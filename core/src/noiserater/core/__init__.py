"""NoiseRater's wire contract and the code that both sides of the wire must share.

- `noiserater.core.v1`: generated messages and stubs of the `noiserater.v1` gRPC API.
- `noiserater.core.codec`: Tensor <-> numpy / torch.
- `noiserater.core.selection`: the rules that turn candidate scores into chosen indices.

Nothing here imports torch at module level: the server image has no torch.
"""
