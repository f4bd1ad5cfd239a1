"""``lmcache-node vllm [vllm serve args...]``: start vLLM with the cache wired from the environment.

Dynamo-style: with ``ENABLE_LMCACHE=1`` the launcher adds a ``--kv-transfer-config`` naming our
connector and execs ``vllm serve``; without it, it execs vLLM untouched. Environment:

- ``ENABLE_LMCACHE``: ``1``/``true``/``yes``/``on`` wires the cache; unset, ``0``/``false``/
  ``no``/``off`` leaves vLLM alone; anything else is an error.
- ``HOST_IP`` (the downward API's ``status.hostIP``): the node server is ``tcp://$HOST_IP``
  unless ``LMCACHE_NODE_HOST`` names it. The connector reads its other ``LMCACHE_NODE_*``
  settings, ``LMCACHE_CHUNK_SIZE`` and ``LMCACHE_NODE_CREDENTIALS_DIR`` itself; the launcher
  checks them first, so a bad value stops the pod in a second, not after vLLM's start.
- ``LMCACHE_LAUNCHER_KV_ROLE``: ``kv_both`` (default), ``kv_producer`` or ``kv_consumer``.
- ``LMCACHE_LAUNCHER_LOAD_FAILURE_POLICY``: vLLM's ``kv_load_failure_policy`` (``recompute`` or
  ``fail``); unset: vLLM's default.
- ``LMCACHE_LAUNCHER_DISAGG=nixl``: disaggregated prefill with NIXL: vLLM's ``MultiConnector``
  with ``NixlConnector`` first (the prefill->decode transfer) and ours second (the cache);
  ``VLLM_NIXL_SIDE_CHANNEL_HOST`` defaults to ``HOST_IP``.
- ``LMCACHE_LAUNCHER_DRY_RUN=1``: print the command (JSON) instead of running it.

A ``--kv-transfer-config`` on the command line (any spelling vLLM accepts, also the
``--kv-transfer-config.key value`` form) is the user's choice: it is passed on unchanged and the
launcher adds none. vLLM runs as ``vllm serve`` (the ``vllm`` next to this Python, else on
``PATH``), or ``python -m vllm.entrypoints.openai.api_server`` where no ``vllm`` script exists.

Imports only the standard library and the connector's settings (vLLM's own requirements;
``python -m e2e.vllm.closure --module lmcache_node.vllm.launcher`` checks it).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmcache_node.vllm.settings import ConnectorConfigError, load_settings

CONNECTOR_CLASS = "LMCacheNodeConnector"
CONNECTOR_MODULE = "lmcache_node.vllm.connector"
NIXL_CONNECTOR = "NixlConnector"
MULTI_CONNECTOR = "MultiConnector"
API_SERVER_MODULE = "vllm.entrypoints.openai.api_server"

ENABLE_ENV = "ENABLE_LMCACHE"
HOST_IP_ENV = "HOST_IP"
NODE_HOST_ENV = "LMCACHE_NODE_HOST"
KV_ROLE_ENV = "LMCACHE_LAUNCHER_KV_ROLE"
FAILURE_POLICY_ENV = "LMCACHE_LAUNCHER_LOAD_FAILURE_POLICY"
DISAGG_ENV = "LMCACHE_LAUNCHER_DISAGG"
DRY_RUN_ENV = "LMCACHE_LAUNCHER_DRY_RUN"
NIXL_HOST_ENV = "VLLM_NIXL_SIDE_CHANNEL_HOST"

KV_ROLES = ("kv_both", "kv_producer", "kv_consumer")
FAILURE_POLICIES = ("recompute", "fail")
DISAGG_MODES = ("nixl",)
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")
_USER_KV_CONFIG = re.compile(r"^--kv[-_]transfer[-_]config(?:[.=]|$)")
_MODEL_OPTION = re.compile(r"^--model(?:=|$)")
# LMCACHE_* variables of this pod's side: the connector's and the launcher's; any other (an
# LMCache setting like LMCACHE_MAX_LOCAL_CPU_SIZE) configures a cache server, not this pod
_OURS_HERE = ("LMCACHE_NODE_", "LMCACHE_LAUNCHER_", "LMCACHE_CHUNK_SIZE")


class LaunchError(ValueError):
    """The environment asks for something the launcher cannot build; the message says what."""


@dataclass(frozen=True)
class Launch:
    """What to exec: ``argv``, with ``env`` added to the environment; ``notes`` say why."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def flag(env: Mapping[str, str], name: str) -> bool:
    value = env.get(name, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise LaunchError(f"{name}={env[name]!r}: use 1 (or true) to enable, 0 (or false) to disable")


def _choice(env: Mapping[str, str], name: str, allowed: Sequence[str], default: str) -> str:
    value = env.get(name, "").strip() or default
    if value not in allowed:
        raise LaunchError(f"{name}={value!r}: use one of {', '.join(allowed)}")
    return value


def node_host(env: Mapping[str, str]) -> str | None:
    """``tcp://$HOST_IP`` for the connector, unless ``LMCACHE_NODE_HOST`` names the server."""
    if env.get(NODE_HOST_ENV, "").strip():
        return None  # the connector reads it
    text = env.get(HOST_IP_ENV, "").strip()
    if not text:
        return None
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        raise LaunchError(
            f"{HOST_IP_ENV}={text!r} is not an IP address: set it from the downward API "
            "(fieldRef status.hostIP), or name the server with LMCACHE_NODE_HOST"
        ) from None
    return f"tcp://[{ip}]" if ip.version == 6 else f"tcp://{ip}"


def connector_config(env: Mapping[str, str]) -> dict[str, Any]:
    """Our connector's kv-transfer-config (settings the connector reads from env stay there)."""
    extra: dict[str, Any] = {}
    host = node_host(env)
    if host is not None:
        extra["lmcache.node.host"] = host
    config: dict[str, Any] = {
        "kv_connector": CONNECTOR_CLASS,
        "kv_connector_module_path": CONNECTOR_MODULE,
        "kv_role": _choice(env, KV_ROLE_ENV, KV_ROLES, "kv_both"),
    }
    policy = env.get(FAILURE_POLICY_ENV, "").strip()
    if policy:
        config["kv_load_failure_policy"] = _choice(env, FAILURE_POLICY_ENV, FAILURE_POLICIES, "")
    config["kv_connector_extra_config"] = extra
    return config


def transfer_config(env: Mapping[str, str], ours: Mapping[str, Any]) -> dict[str, Any]:
    """The whole ``--kv-transfer-config``: ``ours``, or NIXL then ours under MultiConnector."""
    mode = env.get(DISAGG_ENV, "").strip().lower()
    if not mode:
        return dict(ours)
    if mode not in DISAGG_MODES:
        raise LaunchError(f"{DISAGG_ENV}={mode!r}: use nixl, or leave it unset")
    nixl = {"kv_connector": NIXL_CONNECTOR, "kv_role": "kv_both"}
    return {
        "kv_connector": MULTI_CONNECTOR,
        "kv_role": "kv_both",
        "kv_connector_extra_config": {"connectors": [nixl, dict(ours)]},
    }


def vllm_command(args: Sequence[str], vllm_cli: str | None, python: str) -> list[str]:
    """``vllm serve ARGS``; without a ``vllm`` script, the API server module (which takes the
    model as ``--model``, not as a positional argument)."""
    rest = list(args[1:] if args[:1] == ["serve"] else args)
    if vllm_cli is not None:
        return [vllm_cli, "serve", *rest]
    if rest and not rest[0].startswith("-") and not any(_MODEL_OPTION.match(a) for a in rest):
        rest = ["--model", rest[0], *rest[1:]]
    return [python, "-m", API_SERVER_MODULE, *rest]


def find_vllm() -> str | None:
    """The ``vllm`` script of this Python's environment, else the one on ``PATH``."""
    beside = Path(sys.executable).with_name("vllm")
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("vllm")


def server_keys_seen(env: Mapping[str, str]) -> list[str]:
    """``LMCACHE_*`` variables set here that neither the connector nor the launcher reads
    (LMCache's cache settings: a cache server's, and none runs here)."""
    names = {name.upper() for name in env if name.upper().startswith("LMCACHE_")}
    return sorted(name for name in names if not name.startswith(_OURS_HERE))


def plan(
    args: Sequence[str], env: Mapping[str, str], *, vllm_cli: str | None, python: str
) -> Launch:
    """The command to exec for ``lmcache-node vllm ARGS`` under ``env`` (pure)."""
    command = vllm_command(args, vllm_cli, python)
    if not flag(env, ENABLE_ENV):
        return Launch(command, notes=[f"{ENABLE_ENV} is not set: vLLM runs without the cache"])
    if any(_USER_KV_CONFIG.match(arg) for arg in args):
        return Launch(
            command,
            notes=["--kv-transfer-config was given: it is used as is, the launcher adds none"],
        )
    ours = connector_config(env)
    config = transfer_config(env, ours)
    try:
        load_settings(ours["kv_connector_extra_config"], env)  # what the connector will read
    except ConnectorConfigError as exc:
        raise LaunchError(f"the cache connector's settings: {exc}") from None
    notes: list[str] = []
    added: dict[str, str] = {}
    if config["kv_connector"] == MULTI_CONNECTOR and not env.get(NIXL_HOST_ENV):
        host_ip = env.get(HOST_IP_ENV, "").strip()
        if host_ip:
            added[NIXL_HOST_ENV] = host_ip
    if node_host(env) is None and not env.get(NODE_HOST_ENV, "").strip():
        notes.append(f"neither {NODE_HOST_ENV} nor {HOST_IP_ENV} is set: the cache is 127.0.0.1")
    seen = server_keys_seen(env)
    if seen:
        notes.append(
            f"not read in this pod: {', '.join(seen)} (the connector reads LMCACHE_NODE_* and "
            "LMCACHE_CHUNK_SIZE; LMCache's cache settings belong to the cache server, e.g. the "
            "LMCacheCluster's spec.config)"
        )
    text = json.dumps(config, separators=(",", ":"))
    return Launch([*command, "--kv-transfer-config", text], added, notes)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "vllm_args",
        nargs=argparse.REMAINDER,
        metavar="VLLM_SERVE_ARGS",
        help="arguments of `vllm serve` (model first); ENABLE_LMCACHE=1 adds the cache",
    )


def run(args: argparse.Namespace) -> int:
    return launch(list(args.vllm_args))


def launch(args: Sequence[str], env: Mapping[str, str] | None = None) -> int:
    """Plan, then exec (never returns) or, with ``LMCACHE_LAUNCHER_DRY_RUN``, print the plan."""
    environ = dict(os.environ if env is None else env)
    try:
        chosen = plan(args, environ, vllm_cli=find_vllm(), python=sys.executable)
        dry_run = flag(environ, DRY_RUN_ENV)
    except LaunchError as exc:
        print(f"lmcache-node vllm: {exc}", file=sys.stderr)
        return 2
    for note in chosen.notes:
        print(f"lmcache-node vllm: {note}", file=sys.stderr)
    if dry_run:
        print(json.dumps({"argv": chosen.argv, "env": chosen.env}))
        return 0
    print(f"lmcache-node vllm: exec {' '.join(chosen.argv)}", file=sys.stderr, flush=True)
    os.execvpe(chosen.argv[0], chosen.argv, {**environ, **chosen.env})  # noqa: S606


def main(argv: Sequence[str] | None = None) -> int:
    return launch(list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
