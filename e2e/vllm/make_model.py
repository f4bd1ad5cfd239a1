"""Generate a seeded Llama model and a byte-level BPE tokenizer locally (no model hub).

    python e2e/vllm/make_model.py --size tiny --out /tmp/models/tiny
    python e2e/vllm/make_model.py --size demo --out .cache/models/demo

The tokenizer is trained on local text (Debian copyright files), the weights are random
(seeded), so generation is deterministic nonsense: exactly what a KV-cache correctness check
needs (corrupted KV changes the greedy output). Re-running with the same arguments is a no-op
when the directory already holds the same model (a stamp file records the recipe).
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

STAMP = "lmcache-model.json"
CHAT_TEMPLATE = (
    "{% for message in messages %}<s>{{ message['role'] }}: {{ message['content'] }}</s>"
    "{% endfor %}{% if add_generation_prompt %}<s>assistant:{% endif %}"
)


@dataclass(frozen=True)
class ModelRecipe:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    max_position_embeddings: int
    vocab_size: int = 4096
    dtype: str = "bfloat16"
    seed: int = 1234
    version: int = 1


RECIPES: dict[str, ModelRecipe] = {
    # 2 layers, head_dim 32: builds in seconds, a vLLM engine starts in ~20 s.
    "tiny": ModelRecipe(
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=256,
        max_position_embeddings=4096,
    ),
    # Wide and deep enough that an 8k-token prefill costs seconds on a 2-core CPU.
    "demo": ModelRecipe(
        hidden_size=1024,
        num_hidden_layers=12,
        num_attention_heads=16,
        num_key_value_heads=4,
        intermediate_size=2816,
        max_position_embeddings=16384,
    ),
}


def _training_files() -> list[str]:
    files = sorted(glob.glob("/usr/share/doc/*/copyright"))
    if not files:
        files = sorted(glob.glob("/usr/share/common-licenses/*"))
    if not files:
        raise SystemExit("make_model: no local text to train the tokenizer on (/usr/share/doc)")
    return files[:400]


def _build_tokenizer(out: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train(_training_files(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out))


def _build_model(out: Path, recipe: ModelRecipe) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(recipe.seed)
    config = LlamaConfig(
        vocab_size=recipe.vocab_size,
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_hidden_layers,
        num_attention_heads=recipe.num_attention_heads,
        num_key_value_heads=recipe.num_key_value_heads,
        max_position_embeddings=recipe.max_position_embeddings,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        tie_word_embeddings=False,
        torch_dtype=recipe.dtype,
    )
    model = LlamaForCausalLM(config)
    # Larger-than-default init so that activations (and so greedy outputs) depend strongly on
    # every KV value: a corrupted cache entry must change the output.
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.06)
    model = model.to(getattr(torch, recipe.dtype))
    model.save_pretrained(str(out), safe_serialization=True)


def make_model(size: str, out: Path) -> Path:
    recipe = RECIPES[size]
    wanted = {"size": size, **asdict(recipe)}
    stamp = out / STAMP
    if stamp.exists() and json.loads(stamp.read_text()) == wanted:
        return out
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    print(f"make_model: generating the {size} model in {out} ...", file=sys.stderr, flush=True)
    _build_tokenizer(out, recipe.vocab_size)
    _build_model(out, recipe)
    stamp.write_text(json.dumps(wanted, indent=1))
    for path in out.iterdir():  # safetensors are written 0600; pods run as another uid
        path.chmod(0o644)
    print(f"make_model: done in {time.monotonic() - started:.1f} s", file=sys.stderr, flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(RECIPES), default="tiny")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    make_model(args.size, args.out)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
