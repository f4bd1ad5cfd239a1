"""``lmcache-node router``: the cache-aware OpenAI proxy in front of vLLM replicas.

    lmcache-node router --tokenizer /models/llama --endpoints \\
        http://10.0.0.5:8000=tcp://10.0.0.5:5555,http://10.0.0.6:8000=tcp://10.0.0.6:5555
    lmcache-node router --tokenizer meta-llama/Llama-3.1-8B-Instruct --namespace team \\
        --service llama --cache-service cache-cache        # in Kubernetes

Needs the ``[router]`` extra (tokenizers, jinja2, kubernetes_asyncio); never torch.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Sequence

from lmcache_node.logs import setup_logging

log = logging.getLogger(__name__)

CREDENTIALS_ENV = "LMCACHE_NODE_CREDENTIALS_DIR"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--host", default="0.0.0.0", help="Address to serve the OpenAI API on.")  # noqa: S104
    add("--port", type=int, default=8000, help="Port to serve the OpenAI API on.")
    add("--policy", default="cache-aware",
        choices=["cache-aware", "round-robin", "prefix-hash", "session"],
        help="How replicas are chosen (docs/routing.md).")  # fmt: skip
    add("--tokenizer", default=None,
        help="The model's tokenizer: a directory with tokenizer.json (and its chat template) "
             "or a Hugging Face Hub id. Without it requests are routed by load only.")  # fmt: skip
    add("--model-name", default=None,
        help="The model name in the connector's key namespace (its lmcache.node.model_name, "
             "else vLLM's --model); default: any model the node servers publish.")  # fmt: skip
    where = parser.add_argument_group("replicas (one of --endpoints, --service, --pod-selector)")
    where.add_argument(
        "--endpoints",
        default=None,
        help="Static replicas: URL[=tcp://HOST:PORT of its node server],...",
    )
    where.add_argument(
        "--service",
        default=None,
        help="Kubernetes Service of the vLLM replicas (its EndpointSlices).",
    )
    where.add_argument(
        "--pod-selector",
        default=None,
        help="Label selector of the vLLM pods (vLLM deployed by others).",
    )
    where.add_argument(
        "--namespace", default=None, help="Kubernetes namespace (default: the router pod's own)."
    )
    where.add_argument(
        "--port-name",
        default="http",
        help="Port name of the replicas in the Service's EndpointSlices.",
    )
    where.add_argument(
        "--replica-port",
        type=int,
        default=8000,
        help="vLLM's port in the pods (with --pod-selector).",
    )
    where.add_argument(
        "--cache-service",
        default=None,
        help="Kubernetes Service of the cache cluster's node servers (port "
        "named zmq); each replica uses the one on its node.",
    )
    add("--credentials-dir", default=os.environ.get(CREDENTIALS_ENV),
        help=f"Client credentials of the cache cluster (client.key, server.pub; env "
             f"{CREDENTIALS_ENV}); unset: node servers on loopback without CURVE.")  # fmt: skip
    add(
        "--index-max-keys",
        type=int,
        default=1 << 21,
        help="Most chunk keys indexed per node server (about 100 bytes each).",
    )
    add(
        "--resync-secs",
        type=float,
        default=300.0,
        help="Full resynchronisation with each node server this often.",
    )
    add(
        "--metrics-interval-secs",
        type=float,
        default=1.0,
        help="How often each replica's /metrics is read (queue length, health).",
    )
    add(
        "--weight-l1",
        type=float,
        default=0.95,
        help="Share of a token's prefill an L1 hit saves (cost model).",
    )
    add(
        "--weight-l2",
        type=float,
        default=0.8,
        help="Share of a token's prefill an L2 (disk) hit saves (cost model).",
    )
    add(
        "--request-tokens",
        type=float,
        default=64.0,
        help="Load of one in-flight or waiting request, in prefill tokens (cost model).",
    )
    add(
        "--session-header",
        default="x-session-id",
        help="Request header naming the conversation (policy session; else the body's user).",
    )
    add("--max-body-bytes", type=int, default=16 * 1024**2, help="Largest request body.")
    add(
        "--max-concurrent-requests",
        type=int,
        default=1024,
        help="Requests in flight at once; beyond it 503 with Retry-After.",
    )
    add("--connect-timeout-secs", type=float, default=5.0, help="Connecting to a replica.")
    add(
        "--read-timeout-secs",
        type=float,
        default=600.0,
        help="Longest silence of a replica within one response.",
    )
    add("--log-level", default=None, help="DEBUG, INFO, WARNING or ERROR (env LMCACHE_LOG_LEVEL).")


def _in_cluster_namespace() -> str:
    path = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
    with contextlib.suppress(OSError), open(path, encoding="utf-8") as file:
        return file.read().strip()
    return "default"


def run(args: argparse.Namespace) -> int:
    setup_logging(args.log_level)
    try:
        from lmcache_node.router.app import RouterService, build_service  # noqa: PLC0415
    except ImportError as exc:
        print(f"lmcache-node router: {exc}; install the router extra: "
              "pip install 'lmcache-k8s[router]'", file=sys.stderr)  # fmt: skip
        return 2
    sources = [x for x in (args.endpoints, args.service, args.pod_selector) if x]
    if len(sources) != 1:
        print("lmcache-node router: give exactly one of --endpoints, --service or "
              "--pod-selector", file=sys.stderr)  # fmt: skip
        return 2
    if args.namespace is None:
        args.namespace = _in_cluster_namespace()
    try:
        service: RouterService = build_service(args)
    except ValueError as exc:
        print(f"lmcache-node router: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(_serve(service))


async def _serve(service: object) -> int:
    from lmcache_node.router.app import RouterService  # noqa: PLC0415

    assert isinstance(service, RouterService)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await service.start()
    except OSError as exc:
        print(f"lmcache-node router: {exc}", file=sys.stderr)
        await service.stop()
        return 1
    await stop.wait()
    log.info("shutting down")
    await service.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lmcache-node router", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))
