"""Command line of the operator (`lmcache-operator`): crds, run, render."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from lmcache_operator import __version__
from lmcache_operator.api.policy import PodPolicy
from lmcache_operator.builders.node_image import DEFAULTS, NodeImageDefaults


def _add_policy_flags(parser: argparse.ArgumentParser) -> None:
    """The chart's guard rails (allowedHostPathPrefixes, allowPrivilegedPassThrough)."""
    parser.add_argument(
        "--allowed-host-path-prefix",
        action="append",
        default=[],
        metavar="PATH",
        help=(
            "a host directory below which CRs may place host paths (repeatable); default: "
            "/var/cache/lmcache, /var/lib/lmcache, /mnt, /models, /dev/shm"
        ),
    )
    parser.add_argument(
        "--allow-privileged-pass-through",
        action="store_true",
        help="let CR pod fields carry privileges (privileged, capabilities, any hostPath)",
    )


def _add_image_flags(parser: argparse.ArgumentParser) -> None:
    """The chart's nodeImage: what a cluster's image defaults to (CUDA variant on CUDA)."""
    parser.add_argument(
        "--node-image-repository",
        default=DEFAULTS.repository,
        help=f"cache server image repository (default {DEFAULTS.repository})",
    )
    parser.add_argument(
        "--node-image-version",
        default=DEFAULTS.version,
        help=f"tags <version>-cpu and <version>-cuda are used (default {DEFAULTS.version})",
    )
    parser.add_argument(
        "--cuda-runtime-class",
        default=DEFAULTS.cuda_runtime_class,
        help="RuntimeClass of cache pods serving CUDA ('' for none; default nvidia)",
    )


def node_images(args: argparse.Namespace) -> NodeImageDefaults:
    return NodeImageDefaults(
        repository=args.node_image_repository,
        version=args.node_image_version,
        cuda_runtime_class=args.cuda_runtime_class,
    )


def pod_policy(args: argparse.Namespace) -> PodPolicy:
    """The guard rails the flags name; ValueError says which prefix is unusable."""
    return PodPolicy.from_settings(
        args.allowed_host_path_prefix,
        allow_privileged_pass_through=args.allow_privileged_pass_through,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmcache-operator",
        description="Kubernetes operator for LMCacheCluster and VLLMDeployment resources.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    crds = commands.add_parser("crds", help="write the CRDs generated from the API models")
    crds.add_argument("--output-dir", default="crds", help="directory (default: crds)")
    crds.add_argument(
        "--check", action="store_true", help="fail when the files differ instead of writing"
    )

    run = commands.add_parser("run", help="run the operator")
    run.add_argument(
        "-n",
        "--namespace",
        action="append",
        default=[],
        help="watch this namespace (repeatable); all namespaces when omitted",
    )
    run.add_argument(
        "--liveness",
        default="http://0.0.0.0:8081/healthz",
        help="liveness endpoint URL ('' disables it; default http://0.0.0.0:8081/healthz)",
    )
    run.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    _add_policy_flags(run)
    _add_image_flags(run)
    run.add_argument(
        "--leader-election",
        action="store_true",
        help="run as one of several replicas: operate only while holding a Lease (the chart "
        "sets it; a standby takes over within about 10 s of the leader's death)",
    )
    run.add_argument(
        "--lease-namespace",
        default=None,
        help="namespace of the leader Lease (default: $POD_NAMESPACE, else the kubeconfig's "
        "namespace, else default)",
    )
    run.add_argument("--lease-name", default="lmcache-operator", help="name of the leader Lease")
    run.add_argument(
        "--identity",
        default=None,
        help="this replica's name in the Lease (default: $POD_NAME or the host name, "
        "and the process id)",
    )
    run.add_argument(
        "--gate-timeout",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="a vLLM pod whose cache scheduling gate is not lifted within this time gets a "
        "Warning Event and a lmcache.dev/CacheGate condition saying why (default 300)",
    )
    run.add_argument(
        "--secret-check-interval",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="how often each cluster's credential Secrets are checked (a create answered 409 "
        "means present; a deleted one makes new keys and rolls the pods; default 30)",
    )
    run.add_argument(
        "--key-propagation-delay",
        type=float,
        default=90.0,
        metavar="SECONDS",
        help="during a key rotation, the wait between allowing the new client key and "
        "rolling the vLLM pods to it: the time kubelets take to update the cache pods' "
        "mounted key file (default 90)",
    )
    run.add_argument(
        "--pool-probe-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="how long to try reading a new cache pod's L1 pool from its /readyz (the node's "
        "IP and httpPort) once it is Ready: status.endpoints[].pool and the rollout's "
        "adopted figures; a rollout moves on after it either way; 0 reads nothing "
        "(default 10)",
    )
    run.add_argument(
        "--pool-cleanup-timeout",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="how long a deleted LMCacheCluster waits for the Jobs that remove its L1 pools "
        "from its nodes before its finalizer is removed anyway (a Warning Event names the "
        "nodes left; default 300)",
    )

    run.add_argument(
        "--config-check-interval",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="how often the ConfigMaps named by LMCacheClusters' spec.configFrom are read; a "
        "change re-applies the cluster (default 30)",
    )
    run.add_argument(
        "--webhook-port",
        type=int,
        default=None,
        metavar="PORT",
        help="serve the injection webhook (HTTPS) on this port, on every replica; unset: no "
        "webhook server (the chart sets 9443)",
    )
    run.add_argument(
        "--webhook-cert-dir",
        default="/var/run/lmcache/webhook",
        metavar="DIR",
        help="directory with the webhook's tls.crt and tls.key, re-read when they change "
        "(default /var/run/lmcache/webhook)",
    )
    run.add_argument(
        "--webhook-address",
        default="0.0.0.0",  # noqa: S104 - the webhook Service reaches the pod on its IP
        metavar="ADDRESS",
        help="address the webhook server binds (default 0.0.0.0)",
    )

    connection = commands.add_parser(
        "connection",
        help="print the connection contract of LMCacheClusters (offline; what the operator "
        "keeps in <cluster>-connection)",
    )
    connection.add_argument("-f", "--filename", required=True, help="YAML file ('-' for stdin)")
    connection.add_argument(
        "-o",
        "--output",
        choices=["yaml", "json", "patch", "helm-values"],
        default="yaml",
        help="yaml/json: the ConfigMap; patch: a strategic-merge patch of a pod template "
        "(kubectl patch deployment NAME --patch-file FILE); helm-values: values for vLLM "
        "production-stack's chart (default yaml)",
    )
    connection.add_argument(
        "-n",
        "--namespace",
        default=None,
        help="namespace of a cluster whose metadata names none (default: default)",
    )
    connection.add_argument(
        "--container", default="vllm", help="the vLLM container the patch wires (default vllm)"
    )
    connection.add_argument(
        "--no-install-connector",
        action="store_true",
        help="the vLLM image has the lmcache_node package: no init container copies it",
    )
    _add_policy_flags(connection)
    _add_image_flags(connection)

    render = commands.add_parser("render", help="print the objects for a resource file")
    render.add_argument("-f", "--filename", required=True, help="YAML file ('-' for stdin)")
    _add_policy_flags(render)
    _add_image_flags(render)
    return parser


def _crds(output_dir: str, check: bool) -> int:
    from lmcache_operator.crdgen import stale_crds, write_crds  # noqa: PLC0415

    directory = Path(output_dir)
    if check:
        stale = stale_crds(directory)
        if stale:
            print(
                f"stale CRDs in {directory}: {', '.join(stale)}; run `make crds`", file=sys.stderr
            )
            return 1
        return 0
    for path in write_crds(directory):
        print(path)
    return 0


def _render(filename: str, policy: PodPolicy, images: NodeImageDefaults) -> int:
    from lmcache_operator.render import RenderError, render_text  # noqa: PLC0415

    try:
        text = sys.stdin.read() if filename == "-" else Path(filename).read_text("utf-8")
    except OSError as exc:
        print(f"cannot read {filename}: {exc.strerror}", file=sys.stderr)
        return 2
    try:
        sys.stdout.write(render_text(text, policy, images))
    except RenderError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _connection(args: argparse.Namespace, policy: PodPolicy) -> int:
    from lmcache_operator.connection_render import render_connection  # noqa: PLC0415
    from lmcache_operator.validation import RenderError  # noqa: PLC0415

    filename = args.filename
    try:
        text = sys.stdin.read() if filename == "-" else Path(filename).read_text("utf-8")
    except OSError as exc:
        print(f"cannot read {filename}: {exc.strerror}", file=sys.stderr)
        return 2
    try:
        sys.stdout.write(
            render_connection(
                text,
                args.output,
                namespace=args.namespace,
                container=args.container,
                install_connector=not args.no_install_connector,
                policy=policy,
                images=node_images(args),
            )
        )
    except RenderError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "crds":
        return _crds(args.output_dir, args.check)
    if args.command in ("render", "run", "connection"):
        try:
            policy = pod_policy(args)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    if args.command == "render":
        return _render(args.filename, policy, node_images(args))
    if args.command == "connection":
        return _connection(args, policy)
    if args.command == "run":
        from lmcache_operator.runner import RunOptions, run  # noqa: PLC0415
        from lmcache_operator.wiring.admission import WebhookOptions  # noqa: PLC0415

        if args.gate_timeout <= 0:
            parser.error("--gate-timeout must be greater than zero (seconds)")
        if args.secret_check_interval <= 0:
            parser.error("--secret-check-interval must be greater than zero (seconds)")
        if args.key_propagation_delay < 0:
            parser.error("--key-propagation-delay must be zero or more (seconds)")
        if args.pool_probe_timeout < 0:
            parser.error("--pool-probe-timeout must be zero or more (seconds)")
        if args.pool_cleanup_timeout <= 0:
            parser.error("--pool-cleanup-timeout must be greater than zero (seconds)")
        if args.config_check_interval <= 0:
            parser.error("--config-check-interval must be greater than zero (seconds)")
        webhook = None
        if args.webhook_port is not None:
            if not 1 <= args.webhook_port <= 65535:
                parser.error("--webhook-port must be between 1 and 65535")
            webhook = WebhookOptions(args.webhook_port, args.webhook_cert_dir, args.webhook_address)
        return run(
            RunOptions(
                namespaces=tuple(args.namespace),
                liveness_endpoint=args.liveness or None,
                log_level=args.log_level,
                leader_election=args.leader_election,
                lease_namespace=args.lease_namespace,
                lease_name=args.lease_name,
                identity=args.identity,
                gate_timeout_s=args.gate_timeout,
                policy=policy,
                images=node_images(args),
                secret_check_s=args.secret_check_interval,
                key_propagation_s=args.key_propagation_delay,
                pool_probe_timeout_s=args.pool_probe_timeout,
                pool_cleanup_timeout_s=args.pool_cleanup_timeout,
                config_check_s=args.config_check_interval,
                webhook=webhook,
            )
        )
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
