"""A router process in a thread of the test (its own event loop), and a small tokenizer."""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Awaitable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from lmcache_node.router.app import RouterService, build_service
from lmcache_node.router.cli import add_arguments
from lmcache_node.server.process import free_port

T = TypeVar("T")
CHAT_TEMPLATE = (
    "{% for message in messages %}<s>{{ message['role'] }}: {{ message['content'] }}</s>"
    "{% endfor %}{% if add_generation_prompt %}<s>assistant:{% endif %}"
)


def make_tokenizer(directory: Path) -> Path:
    """A byte-level BPE trained on local text, saved like a model's tokenizer files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    text = [Path(__file__).read_text()] * 4 + [Path(json.__file__).read_text()]
    tokenizer.train_from_iterator(text, trainer)
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "chat_template": CHAT_TEMPLATE}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


class RouterThread:
    """``lmcache-node router`` with the given flags, served from a thread of this process."""

    def __init__(self, *flags: str) -> None:
        parser = argparse.ArgumentParser()
        add_arguments(parser)
        self.port = free_port()
        args = parser.parse_args(
            ["--host", "127.0.0.1", "--port", str(self.port), "--namespace", "default", *flags]
        )
        self.service: RouterService = build_service(args)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()  # upstreams may start on this loop before the router does

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def call(self, work: Coroutine[Any, Any, T] | Awaitable[T], timeout: float = 60) -> T:
        future = asyncio.run_coroutine_threadsafe(work, self.loop)  # type: ignore[arg-type]
        return future.result(timeout)

    def __enter__(self) -> RouterThread:
        self.call(self.service.start())
        return self

    def __exit__(self, *exc: object) -> None:
        self.call(self.service.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


def post(url: str, body: dict[str, Any] | bytes, headers: dict[str, str] | None = None,
         timeout: float = 30) -> tuple[int, bytes, dict[str, str]]:  # fmt: skip
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data, {"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


def get(url: str, timeout: float = 30) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
