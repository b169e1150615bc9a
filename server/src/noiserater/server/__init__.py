"""rater-server: batched gRPC scoring of candidate noises with onnxruntime (see docs/serving.md)."""
