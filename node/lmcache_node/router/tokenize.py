"""The prompt's tokens as vLLM will see them: the model's tokenizer and chat template.

``tokenizers`` (the Rust library transformers itself wraps) reads ``tokenizer.json``; chat
messages are rendered with the model's Jinja chat template in a sandbox configured like
transformers' (``trim_blocks``, ``lstrip_blocks``, ``raise_exception``, ``strftime_now``).
No torch, no transformers: the router starts in a fraction of a second (docs/routing.md
has the measurement). Like vLLM, completions add special tokens and chat requests do not
(the template writes them), unless the request says otherwise. A tokenizer that differs
from vLLM's only costs routing quality: the keys miss and the request goes by load.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jinja2
import jinja2.sandbox
import tokenizers

log = logging.getLogger(__name__)


class TokenizerError(ValueError):
    """The tokenizer or its chat template cannot be loaded; the message says where."""


class PromptError(ValueError):
    """A request whose prompt the router cannot read (it is still forwarded)."""


def _token_text(value: object) -> str:
    if isinstance(value, dict):
        return str(value.get("content", ""))
    return "" if value is None else str(value)


def _tojson(value: object, indent: int | None = None, **_: object) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _raise(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _load_files(source: str) -> tuple[Path, Path | None, Path | None]:
    """tokenizer.json, tokenizer_config.json and chat_template.jinja of a directory, or of
    a Hugging Face Hub repository (downloaded with ``huggingface_hub``)."""
    directory = Path(source)
    if directory.is_dir():
        config = directory / "tokenizer_config.json"
        template = directory / "chat_template.jinja"
        main = directory / "tokenizer.json"
        if not main.is_file():
            raise TokenizerError(
                f"{main} does not exist: the router needs the model's fast tokenizer "
                "(tokenizer.json); point --tokenizer at the model directory"
            )
        return main, config if config.is_file() else None, template if template.is_file() else None
    from huggingface_hub import hf_hub_download  # noqa: PLC0415 - only for hub names
    from huggingface_hub.errors import EntryNotFoundError  # noqa: PLC0415

    def fetch(name: str) -> Path | None:
        try:
            return Path(hf_hub_download(source, name))
        except EntryNotFoundError:
            return None

    found = fetch("tokenizer.json")
    if found is None:
        raise TokenizerError(f"the Hub repository {source!r} has no tokenizer.json")
    return found, fetch("tokenizer_config.json"), fetch("chat_template.jinja")


class PromptTokenizer:
    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        *,
        chat_template: str | None = None,
        special_tokens: Mapping[str, str] | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.special_tokens = dict(special_tokens or {})
        self._template: jinja2.Template | None = None
        if chat_template:
            env = jinja2.sandbox.ImmutableSandboxedEnvironment(
                trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
            )
            env.filters["tojson"] = _tojson
            env.globals["raise_exception"] = _raise
            env.globals["strftime_now"] = time.strftime
            try:
                self._template = env.from_string(chat_template)
            except jinja2.TemplateError as exc:
                raise TokenizerError(f"the chat template does not compile: {exc}") from None

    @classmethod
    def load(cls, source: str) -> PromptTokenizer:
        """From a model directory or a Hugging Face Hub repository id."""
        main, config_file, template_file = _load_files(source)
        try:
            tokenizer = tokenizers.Tokenizer.from_file(str(main))
        except Exception as exc:  # the library raises plain Exception on bad files
            log.exception("cannot load the tokenizer %s", main)
            raise TokenizerError(f"cannot load {main}: {exc}") from None
        config: dict[str, Any] = {}
        if config_file is not None:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        template = template_file.read_text(encoding="utf-8") if template_file else None
        if template is None:
            template = _config_template(config.get("chat_template"))
        specials = {
            name: _token_text(config.get(name))
            for name in ("bos_token", "eos_token", "unk_token", "pad_token")
            if config.get(name) is not None
        }
        return cls(tokenizer, chat_template=template, special_tokens=specials)

    @property
    def has_chat_template(self) -> bool:
        return self._template is not None

    # ----- requests -----
    def completion(self, body: Mapping[str, Any]) -> list[int]:
        """Tokens of a /v1/completions request (the first prompt of a batch)."""
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt:
            prompt = prompt[0]
        if isinstance(prompt, list):
            if not all(isinstance(t, int) for t in prompt):
                raise PromptError("a token prompt holds integers only")
            return list(prompt)
        if not isinstance(prompt, str):
            raise PromptError("prompt must be a string or token ids")
        return self.encode(prompt, add_special_tokens=bool(body.get("add_special_tokens", True)))

    def chat(self, body: Mapping[str, Any]) -> list[int]:
        """Tokens of a /v1/chat/completions request, rendered with the chat template."""
        if self._template is None:
            raise PromptError("the tokenizer has no chat template")
        messages = body.get("messages")
        if not isinstance(messages, list) or not all(isinstance(x, dict) for x in messages):
            raise PromptError("messages must be a list of objects")
        kwargs = body.get("chat_template_kwargs")
        context: dict[str, Any] = {
            **self.special_tokens,
            **(kwargs if isinstance(kwargs, dict) else {}),
            "messages": [_flatten(message) for message in messages],
            "add_generation_prompt": bool(body.get("add_generation_prompt", True)),
        }
        if body.get("tools"):
            context["tools"] = body["tools"]
        try:
            text = self._template.render(**context)
        except jinja2.TemplateError as exc:
            raise PromptError(f"the chat template failed: {exc}") from None
        return self.encode(text, add_special_tokens=bool(body.get("add_special_tokens", False)))

    def encode(self, text: str, *, add_special_tokens: bool) -> list[int]:
        ids: list[int] = self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        return ids


def _flatten(message: dict[str, Any]) -> dict[str, Any]:
    """OpenAI content parts -> one string, as vLLM hands "string" templates their content."""
    content = message.get("content")
    if isinstance(content, list):
        texts = [p.get("text", "") for p in content if isinstance(p, dict) and "text" in p]
        return {**message, "content": "\n".join(str(t) for t in texts)}
    return message


def _config_template(value: object) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # named templates: the default one
        for item in value:
            if isinstance(item, dict) and item.get("name") == "default":
                return str(item.get("template", ""))
    return None
