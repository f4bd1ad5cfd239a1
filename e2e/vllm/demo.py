"""``make demo``: the same long prompt twice through vLLM + the node server; cold vs warm TTFT.

Starts a node server and one vLLM (CPU) with our connector on a locally generated model big
enough that prefilling an 8k-token prompt takes seconds, sends the prompt twice and prints
cold TTFT, warm TTFT, speed-up and hit tokens, then one JSON line. Everything runs on
127.0.0.1 and is stopped at the end; logs stay in ``.cache/demo/``.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

from lmcache_node.server.process import ServerProcess

from e2e.vllm.harness import VLLMProcess, metric, post_json, prompt_text, server_python
from e2e.vllm.make_model import make_model

ROOT = Path(__file__).resolve().parents[2]


def say(message: str) -> None:
    print(f"\033[36m[demo {time.strftime('%H:%M:%S')}]\033[0m {message}", flush=True)


def wait_with_progress(instance: VLLMProcess, timeout_s: float) -> None:
    """Wait for vLLM, printing the elapsed time and its latest log line every 10 s."""
    done = threading.Event()
    error: list[BaseException] = []

    def wait() -> None:
        try:
            instance.wait_ready(timeout_s)
        except BaseException as exc:  # reported by the caller
            error.append(exc)
        finally:
            done.set()

    started = time.monotonic()
    threading.Thread(target=wait, daemon=True).start()
    while not done.wait(10):
        lines = [line for line in instance.log_text().splitlines() if line.strip()]
        last = lines[-1].split("] ", 1)[-1][:90] if lines else "starting"
        say(f"  ... {time.monotonic() - started:4.0f} s  {last}")
    if error:
        raise error[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8000, help="prompt length in tokens")
    parser.add_argument("--size", default="demo", help="model recipe (see make_model.py)")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens to generate")
    parser.add_argument("--work-dir", type=Path, default=ROOT / ".cache" / "demo")
    args = parser.parse_args(argv)
    work: Path = args.work_dir
    work.mkdir(parents=True, exist_ok=True)

    say(f"1/4 generating the {args.size} model (seeded, no model hub; cached after the first run)")
    model = make_model(args.size, ROOT / ".cache" / "models" / args.size)

    say("2/4 starting the node server (lmcache-node serve, 2 GiB L1)")
    server_log = work / "node-server.log"
    server_log.unlink(missing_ok=True)
    server = ServerProcess(
        "--chunk-size", "256", "--max-local-cpu-size", "2", log_file=server_log,
        python=server_python(),
    )  # fmt: skip
    server.start()
    vllm = VLLMProcess(
        "demo",
        model,
        work_dir=work,
        kv_role="kv_both",
        node_port=server.port,
        max_model_len=max(4096, args.tokens + args.max_tokens + 64),
        kv_cache_gib=2,
        extra_args=("--max-num-batched-tokens", str(max(8192, args.tokens + 64))),
    )
    vllm.log_file.unlink(missing_ok=True)
    try:
        say("3/4 starting vLLM with the LMCacheNodeConnector (about a minute; more the first time)")
        vllm.start()
        wait_with_progress(vllm, 900)

        say(f"4/4 sending a {args.tokens}-token prompt twice")
        text = prompt_text(8, args.tokens * 6)
        ids = post_json(vllm.url + "/tokenize", {"model": str(model), "prompt": text})["tokens"]
        if len(ids) < args.tokens:
            raise SystemExit(f"the local text gave only {len(ids)} tokens; use --tokens smaller")
        prompt = ids[: args.tokens]
        vllm.complete(prompt_text(9, 2000), max_tokens=2)  # warm up vLLM itself, not the cache
        retrieved = metric(server.http_url, "lmcache_node_tokens_total", 'kind="retrieved"')
        cold = vllm.complete(prompt, max_tokens=args.max_tokens)
        after_cold = metric(server.http_url, "lmcache_node_tokens_total", 'kind="retrieved"')
        warm = vllm.complete(prompt, max_tokens=args.max_tokens)
        after_warm = metric(server.http_url, "lmcache_node_tokens_total", 'kind="retrieved"')
        # vLLM's own floor: a fresh prompt as short as the part the warm query still computes
        # (best of 3: single samples are noisy on a shared 2-core machine).
        tail = args.tokens % 256 or 256
        floor_s = min(
            vllm.complete([*ids[-tail:-1], 7 + i], max_tokens=args.max_tokens).ttft_s
            for i in range(3)
        )
    except BaseException:
        print(vllm.log_tail(3000), file=sys.stderr)
        raise
    finally:
        vllm.stop()
        server.terminate()

    hit_tokens = int(after_warm - after_cold)
    result = {
        "prompt_tokens": cold.prompt_tokens,
        "hit_tokens": hit_tokens,
        "cold_ttft_s": round(cold.ttft_s, 3),
        "warm_ttft_s": round(warm.ttft_s, 3),
        "speedup": round(cold.ttft_s / warm.ttft_s, 1) if warm.ttft_s > 0 else None,
        "same_output": warm.text == cold.text,
    }
    print()
    print("  query twice through the node server")
    print("  ----------------------------------------------")
    print(f"  prompt tokens        {result['prompt_tokens']:>10}")
    print(f"  cold TTFT (compute)  {cold.ttft_s:>10.3f} s")
    print(f"  warm TTFT (cache)    {warm.ttft_s:>10.3f} s")
    print(f"  speed-up             {result['speedup']:>10}x")
    print(f"  hit tokens           {hit_tokens:>10}  (loaded from the node server)")
    print(f"  vLLM floor TTFT      {floor_s:>10.3f} s  (a fresh {tail}-token prompt, best of 3)")
    print(f"  same greedy output   {result['same_output']!s:>10}")
    print(f"  (cold query retrieved {int(after_cold - retrieved)} tokens: nothing was cached yet)")
    print()
    print(json.dumps(result))
    return 0 if result["same_output"] and hit_tokens > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
