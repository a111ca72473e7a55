"""One real Triton Inference Server (PyTriton's tritonserver 2.51 on CPU) for the real-Triton test.

Run by the interpreter of .venv-triton (built by ``make triton``), not the project's:
``server.py --workspace DIR --http-port P --grpc-port P --metrics-port P --models m[:v],...``.
Every port binds 127.0.0.1. The models are Python functions with known behaviour:

- ``batched``: dynamic batching (max batch 16, requests held up to 20 ms to batch), y = 2x.
- ``cached``: the response cache on, 20 ms per execution, y = x + 1.
- ``versioned``: y = x * version; PyTriton serves one version of a name per server, so a fleet
  holds two versions by loading ``versioned:1`` on one server and ``versioned:2`` on another.
- ``flaky``: raises on any input below 0 (Triton counts a failure), y = x otherwise.

SIGTERM becomes KeyboardInterrupt so that PyTriton stops its tritonserver and cleans up; left to
the default action it would kill this process alone and orphan tritonserver.
"""

from __future__ import annotations

import argparse
import os
import signal
import sysconfig
import time
from pathlib import Path
from typing import Any

import numpy as np
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

#: Seconds one execution of ``cached`` takes: a lower bound of its compute time.
CACHED_EXECUTION_S = 0.02
#: Bytes of Triton's local response cache.
CACHE_BYTES = 1 << 20

Requests = list[dict[str, np.ndarray]]


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


@batch
def batched(x: np.ndarray) -> dict[str, np.ndarray]:
    time.sleep(0.005)
    return {"y": x * 2}


def cached(requests: Requests) -> list[dict[str, np.ndarray]]:
    time.sleep(CACHED_EXECUTION_S)
    return [{"y": r["x"] + 1} for r in requests]


def versioned(version: int) -> Any:
    def infer(requests: Requests) -> list[dict[str, np.ndarray]]:
        return [{"y": r["x"] * version} for r in requests]

    return infer


def flaky(requests: Requests) -> list[dict[str, np.ndarray]]:
    if any((r["x"] < 0).any() for r in requests):
        raise ValueError("marked input: this request fails on purpose")
    return [{"y": r["x"]} for r in requests]


def bind(triton: Triton, spec: str) -> None:
    name, _, version_text = spec.partition(":")
    version = int(version_text or 1)
    io = {"inputs": [Tensor(name="x", dtype=np.float32, shape=(1,))],
          "outputs": [Tensor(name="y", dtype=np.float32, shape=(1,))]}
    unbatched = ModelConfig(batching=False)
    if name == "batched":
        config = ModelConfig(max_batch_size=16,
                             batcher=DynamicBatcher(max_queue_delay_microseconds=20_000))
        triton.bind(name, batched, **io, config=config)
    elif name == "cached":
        triton.bind(name, cached, **io, config=ModelConfig(batching=False, response_cache=True))
    elif name == "versioned":
        triton.bind(name, versioned(version), **io, model_version=version, config=unbatched)
    elif name == "flaky":
        triton.bind(name, flaky, **io, config=unbatched)
    else:
        raise SystemExit(f"unknown model {name!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", type=Path, required=True)
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--metrics-port", type=int, required=True)
    parser.add_argument("--models", required=True, help="comma-separated name[:version]")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _interrupt)
    # The Python-backend stub that tritonserver starts links libpython3.11.so.1.0: this
    # interpreter's, not whichever the loader finds first (pyenv and Debian builds differ).
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir:
        inherited = os.environ.get("LD_LIBRARY_PATH")
        os.environ["LD_LIBRARY_PATH"] = f"{libdir}:{inherited}" if inherited else libdir
    config = TritonConfig(
        http_address="127.0.0.1", http_port=args.http_port,
        grpc_address="127.0.0.1", grpc_port=args.grpc_port,
        metrics_address="127.0.0.1", metrics_port=args.metrics_port,
        allow_gpu_metrics=False,
        cache_config=[f"local,size={CACHE_BYTES}"],
    )
    with Triton(config=config, workspace=args.workspace) as triton:
        for spec in args.models.split(","):
            bind(triton, spec)
        print("models bound", flush=True)
        triton.serve()


if __name__ == "__main__":
    main()
