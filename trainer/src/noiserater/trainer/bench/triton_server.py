"""Triton Inference Server (through PyTriton) serving a rater ONNX the way rater-server does: the reference of
`nrctl bench serve-vs-triton`.

Run as a script with the interpreter of the PyTriton environment (triton_env.py), not imported by the
project: PyTriton pins numpy < 2, protobuf 6 and tritonclient 2.5x, which the project's own environment
cannot hold. It needs noiserater.core (numpy only: scoring and selection) on PYTHONPATH.

Two models, both dynamically batched by Triton (no queue delay unless asked) over `--instances` instances,
each instance its own onnxruntime session (CPU provider, `--threads` intra-op threads):
- `<model>`: scores triples, x0 [N, *data] / t [N, 1] / eps [N, *data] -> score [N, 1], the work of rater-server's
  KServe ModelInfer (Triton's batch axis is the triples axis, max_batch_size = `--max-batch` triples);
- `<model>_select`: the top-`--keep` of K selection of rater-server's SelectNoise, x0 [B, *data] / t [B, 1] /
  candidates [B, K, *data] -> indices [B, keep] / scores [B, keep], through the same SelectionPlan and
  RaterSession (max_batch_size = `--max-batch` // K samples, the same triples per run).
Prints one line `triton ready grpc=PORT http=PORT` once both models are served, then serves until SIGTERM/SIGINT.
The endpoints that PyTriton protects with a token by default (statistics among them, which perf_analyzer
reads) are left open: the server binds loopback only.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--onnx", required=True)
    parser.add_argument("--model", default="digits")
    parser.add_argument("--k", type=int, default=8, help="candidates per sample of the selection model")
    parser.add_argument("--keep", type=int, default=1)
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--metrics-port", type=int, required=True)
    parser.add_argument("--instances", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads per instance")
    parser.add_argument("--max-batch", type=int, default=8192, help="triples per onnxruntime run at most")
    parser.add_argument("--max-delay-us", type=int, default=0, help="Triton's max_queue_delay_microseconds")
    parser.add_argument("--workspace", default=None)
    args = parser.parse_args(argv)

    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig

    from noiserater.core.scoring import RaterSession
    from noiserater.core.selection import SelectionPlan

    sessions = [RaterSession(args.onnx, device="cpu", intra_op_threads=args.threads) for _ in range(args.instances)]
    for session in sessions:
        session.warm_up()
    info = sessions[0].info
    data = tuple(info.data_shape)
    plan = SelectionPlan(args.k, args.keep)

    def score_fn(session: RaterSession):
        @batch
        def infer(x0: np.ndarray, t: np.ndarray, eps: np.ndarray) -> dict[str, np.ndarray]:
            return {"score": session.score(x0, t.reshape(-1), eps).reshape(-1, 1)}
        return infer

    def select_fn(session: RaterSession):
        @batch
        def infer(x0: np.ndarray, t: np.ndarray, candidates: np.ndarray) -> dict[str, np.ndarray]:
            t = t.reshape(-1)
            plan.validate(info, x0, t, candidates)  # as rater-server checks every request
            indices, chosen = plan.choose(session.score(*plan.triples(x0, t, candidates)))
            return {"indices": indices, "scores": chosen}
        return infer

    def batcher() -> DynamicBatcher:
        return DynamicBatcher(max_queue_delay_microseconds=args.max_delay_us)

    config = TritonConfig(grpc_address="127.0.0.1", grpc_port=args.grpc_port, http_address="127.0.0.1",
                          http_port=args.http_port, metrics_port=args.metrics_port, allow_metrics=False,
                          exit_on_error=True)
    with Triton(config=config, workspace=args.workspace,
                security_config=TritonSecurityConfig(restricted_endpoints=[])) as triton:
        triton.bind(
            model_name=args.model, infer_func=[score_fn(s) for s in sessions],
            inputs=[Tensor(name="x0", dtype=np.float32, shape=data), Tensor(name="t", dtype=np.int64, shape=(1,)),
                    Tensor(name="eps", dtype=np.float32, shape=data)],
            outputs=[Tensor(name="score", dtype=np.float32, shape=(1,))],
            config=ModelConfig(max_batch_size=args.max_batch, batcher=batcher()), strict=True)
        triton.bind(
            model_name=f"{args.model}_select", infer_func=[select_fn(s) for s in sessions],
            inputs=[Tensor(name="x0", dtype=np.float32, shape=data), Tensor(name="t", dtype=np.int64, shape=(1,)),
                    Tensor(name="candidates", dtype=np.float32, shape=(args.k, *data))],
            outputs=[Tensor(name="indices", dtype=np.int64, shape=(args.keep,)),
                     Tensor(name="scores", dtype=np.float32, shape=(args.keep,))],
            config=ModelConfig(max_batch_size=max(1, args.max_batch // args.k), batcher=batcher()), strict=True)
        print(f"triton ready grpc={args.grpc_port} http={args.http_port}", flush=True)
        triton.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
