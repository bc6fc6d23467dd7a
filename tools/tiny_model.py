"""Build a tiny random-weight Qwen2 causal LM that vLLM's CPU build can serve.

The tests need a real engine without a model hub, so everything is made offline:
weights come from a seeded numpy generator and a byte-level BPE tokenizer is trained
in-process on the corpus below. Only numpy, safetensors and tokenizers are used so the
script runs in the project's light venv (no torch, no transformers).

The weights also steer output (see _weights): the model never emits special tokens
(so no EOS: it always runs to max_tokens or a ``stop`` string) or bytes that are not
printable ASCII, so streamed and whole replies are clean text that compares exactly.

Usage: ``python tools/tiny_model.py OUT_DIR [--seed N]``; prints the model directory.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

__all__ = [
    "MARKER", "build_atomically", "build_cli", "build_tiny_model", "is_built", "main",
    "make_readable",
]  # fmt: skip

# Bump when the recipe changes so stale directories are rebuilt instead of reused.
FORMAT_VERSION = 2
# Written last, so its presence means every other file is complete.
MARKER = ".kscope-tiny-model.json"

# vLLM's CPU attention rejects head_dim 16; 128 hidden / 4 heads = 32 is the smallest
# size it accepts, which keeps the model small.
HIDDEN = 128
HEADS = 4
KV_HEADS = 2
HEAD_DIM = HIDDEN // HEADS
# In float32 two layers generate ~7,000 tokens/s on these CPUs: a whole 1,800-token
# request ends before a test can watch it run (or abort it). 24 layers keep it tiny
# (~10 MB) but slow enough that a long request lasts seconds.
LAYERS = 24
INTERMEDIATE = 256
MAX_POSITIONS = 4096
TARGET_VOCAB = 1536
INIT_STD = 0.02
# Bias channel (see _weights): 0.2 is about the norm of the other 127 embedding dims, so
# after RMSNorm it reads ~5; times BAN_WEIGHT that is a ~-30 logit for banned tokens.
BIAS_DIM = 0
BIAS_VALUE = 0.2
BAN_WEIGHT = -6.0
# A 0.02 head gives near-uniform logits (top-2 gaps ~0.01) that bf16 rounding or batching
# can flip; 10x wider makes greedy output stable while sampling stays varied.
HEAD_STD = 0.2

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
# Trainer order fixes the ids: <|endoftext|>=0, <|im_start|>=1, <|im_end|>=2.
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END]

# ChatML as Qwen2 uses it, minus the default system prompt so prompts stay predictable.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Varied text (prose, dialogue, code, numbers, punctuation) so the merges cover common
# English fragments and tokenisation of test prompts is not just single bytes.
CORPUS = """\
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a
single step. It was the best of times, it was the worst of times, it was the age of wisdom,
it was the age of foolishness. Call me Ishmael. All happy families are alike; each unhappy
family is unhappy in its own way.

Hello! How are you today? I am fine, thank you. What would you like to talk about? Let us
discuss the weather, the news, science, history, music, art, sports, food and travel.
"Can you help me write a short poem?" she asked. "Of course," replied the assistant, "here
is one about the sea and the sky, the wind and the rain, the sun and the moon."

Once upon a time, in a small village near the mountains, there lived an old baker named
Thomas. Every morning he woke before dawn, lit the oven, and kneaded dough for bread, rolls
and pastries. Children would gather by the window to watch the loaves rise and turn golden.
One winter the river froze, the roads closed, and the village depended on his bakery.

Machine learning models are trained on large datasets. A language model predicts the next
token given the previous tokens. Inference servers batch requests, schedule prefill and
decode steps, and stream tokens back to clients. Latency, throughput, memory and cost are
the numbers operators watch. The gateway routes each request to a healthy replica, retries
when a node fails, and reports usage: prompt tokens, completion tokens and total tokens.

def fibonacci(n: int) -> int:
    if n < 2:
        return n
    return fibonacci(n - 1) + fibonacci(n - 2)

for i in range(10):
    print(f"value {i}: {fibonacci(i)}")

SELECT name, count(*) FROM requests WHERE status = 'ok' GROUP BY name ORDER BY 2 DESC;
{"model": "tiny", "messages": [{"role": "user", "content": "Say hello."}], "stream": true}

Numbers: 0 1 2 3 4 5 6 7 8 9 10 12 25 42 64 100 128 256 512 1024 2048 4096 3.14 2.718 1e-5.
Dates such as 2024-01-15 and times like 12:30:45 appear in logs. Prices: $19.99, 5%, 7/8.
Monday, Tuesday, Wednesday, Thursday, Friday, Saturday and Sunday. January, February, March,
April, May, June, July, August, September, October, November, December. Red, orange, yellow,
green, blue, indigo, violet, black, white, grey and brown.

The cat sat on the mat. The dog chased the ball across the garden. Birds sang in the trees
while bees moved from flower to flower. A farmer planted wheat, corn, potatoes and beans.
The teacher explained fractions; the students asked questions and wrote answers in their
notebooks. Doctors, nurses, engineers, writers, pilots and chefs all work hard every day.

Water boils at one hundred degrees Celsius at sea level. The Earth orbits the Sun once a year
and the Moon orbits the Earth about once a month. Light travels faster than sound, which is
why we see lightning before we hear thunder. Plants turn sunlight, water and carbon dioxide
into sugar and oxygen. Gravity keeps planets in orbit and makes apples fall from trees.

Please summarize the following paragraph in one sentence. Translate this text into French.
Explain the difference between a list and a tuple. Give three reasons why sleep matters.
Write a haiku about autumn leaves. What is the capital of France? Paris is the capital.
Tell me a joke. Why did the scarecrow win an award? Because he was outstanding in his field.

Error: connection refused. Warning: disk almost full. Info: server started on port 8000.
Debug: received 3 requests, 2 succeeded, 1 failed with a timeout after 30 seconds.
Yes. No. Maybe. OK. Thanks! Goodbye. See you soon. Have a nice day. Good night.
We will meet at the station at noon, then take the train north along the coast, past quiet
harbours, fishing boats, lighthouses and long sandy beaches, until we reach the old castle.
"""


def _train_tokenizer() -> Tokenizer:
    """Train a byte-level BPE on CORPUS with the ChatML special tokens."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    # Byte-level pre-tokenisation with GPT-2's regex, as Qwen2 does; no prefix space so
    # "Hello" and " Hello" round-trip exactly.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TARGET_VOCAB,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        # Seed all 256 byte symbols so any UTF-8 input can be encoded.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Repeat the corpus so pair counts are large enough to be ordered stably.
    tok.train_from_iterator([CORPUS] * 4, trainer=trainer)
    return tok


F32Array = np.ndarray[Any, np.dtype[np.float32]]


def _banned_ids(tok: Tokenizer) -> list[int]:
    """Ids the model should never emit: special tokens and non-printable pieces.

    Lone bytes >= 0x80 are invalid UTF-8 on their own, so vLLM's detokenizer holds them
    back (empty deltas, U+FFFD in text); special tokens would end or corrupt a reply.
    """
    banned = []
    for i in range(tok.get_vocab_size()):
        text = tok.decode([i], skip_special_tokens=False)
        special = tok.id_to_token(i) in SPECIAL_TOKENS
        clean = text.isascii() and all(c.isprintable() or c == "\n" for c in text)
        if special or not text or not clean:
            banned.append(i)
    return banned


def _weights(vocab: int, banned: list[int], seed: int) -> dict[str, F32Array]:
    """Return Qwen2 tensors named exactly as Hugging Face's checkpoint layout.

    Hidden dim 0 is a constant "bias channel": every embedding has BIAS_VALUE there and
    no layer reads or writes it, so after the final norm it is a large positive constant.
    lm_head rows of banned ids put BAN_WEIGHT on it, pushing their logits ~30 below the
    rest; Qwen2's lm_head has no bias, so this is how to mask tokens in weights alone.
    """
    rng = np.random.default_rng(seed)

    def normal(*shape: int) -> F32Array:
        return (rng.standard_normal(shape) * INIT_STD).astype(np.float32)

    def reads(out: int, inp: int) -> F32Array:
        # Layers ignore the bias channel, else its constant would swamp the context.
        m = normal(out, inp)
        m[:, BIAS_DIM] = 0.0
        return m

    def writes(out: int, inp: int) -> F32Array:
        # Layers leave the bias channel untouched, so it stays exactly BIAS_VALUE.
        m = normal(out, inp)
        m[BIAS_DIM, :] = 0.0
        return m

    def zeros(n: int) -> F32Array:
        return np.zeros(n, dtype=np.float32)

    def ones(n: int) -> F32Array:
        # RMSNorm scales start at 1, as in a freshly initialised model.
        return np.ones(n, dtype=np.float32)

    embed = normal(vocab, HIDDEN)
    embed[:, BIAS_DIM] = BIAS_VALUE
    kv = KV_HEADS * HEAD_DIM
    w: dict[str, F32Array] = {"model.embed_tokens.weight": embed}
    for i in range(LAYERS):
        p = f"model.layers.{i}"
        w[f"{p}.input_layernorm.weight"] = ones(HIDDEN)
        w[f"{p}.post_attention_layernorm.weight"] = ones(HIDDEN)
        w[f"{p}.self_attn.q_proj.weight"] = reads(HIDDEN, HIDDEN)
        w[f"{p}.self_attn.k_proj.weight"] = reads(kv, HIDDEN)
        w[f"{p}.self_attn.v_proj.weight"] = reads(kv, HIDDEN)
        w[f"{p}.self_attn.o_proj.weight"] = writes(HIDDEN, HIDDEN)
        # Qwen2 has biases on q/k/v (only), so its checkpoints carry them.
        w[f"{p}.self_attn.q_proj.bias"] = zeros(HIDDEN)
        w[f"{p}.self_attn.k_proj.bias"] = zeros(kv)
        w[f"{p}.self_attn.v_proj.bias"] = zeros(kv)
        w[f"{p}.mlp.gate_proj.weight"] = reads(INTERMEDIATE, HIDDEN)
        w[f"{p}.mlp.up_proj.weight"] = reads(INTERMEDIATE, HIDDEN)
        w[f"{p}.mlp.down_proj.weight"] = writes(HIDDEN, INTERMEDIATE)
    w["model.norm.weight"] = ones(HIDDEN)
    # Untied head: with tied embeddings a random model mostly repeats its last token.
    head = (rng.standard_normal((vocab, HIDDEN)) * HEAD_STD).astype(np.float32)
    head[:, BIAS_DIM] = 0.0
    head[banned, BIAS_DIM] = BAN_WEIGHT
    w["lm_head.weight"] = head
    return w


def _config(vocab: int, eos: int, bos: int) -> dict[str, Any]:
    """Return a Qwen2 config.json; sizes stay ints since they feed shape arithmetic."""
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": vocab,
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "hidden_act": "silu",
        "max_position_embeddings": MAX_POSITIONS,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "attention_dropout": 0.0,
        "initializer_range": INIT_STD,
        "use_cache": True,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": LAYERS,
        "tie_word_embeddings": False,
        "bos_token_id": bos,
        "eos_token_id": eos,
        # Weights are stored as float32 (numpy has no bfloat16). vLLM's --dtype auto still
        # downcasts on CPU (bf16 to generate, fp16 to pool); "dtype" is transformers 5's key.
        "torch_dtype": "float32",
        "dtype": "float32",
    }


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def _write_model(d: Path, seed: int) -> None:
    """Write every model file into the (empty) directory d, marker last."""
    tok = _train_tokenizer()
    vocab = tok.get_vocab_size()
    ids: dict[str, int] = {}
    for t in SPECIAL_TOKENS:
        i = tok.token_to_id(t)
        assert i is not None, t  # the trainer always adds its special tokens
        ids[t] = i
    eos, bos = ids[IM_END], ids[ENDOFTEXT]

    tok.save(str(d / "tokenizer.json"))
    save_file(
        _weights(vocab, _banned_ids(tok), seed),
        str(d / "model.safetensors"),
        metadata={"format": "pt"},
    )
    _write_json(d / "config.json", _config(vocab, eos, bos))
    _write_json(
        d / "generation_config.json",
        # Both ids stop generation, like Qwen2 instruct; no sampling defaults, so request
        # parameters alone decide sampling.
        {"bos_token_id": bos, "eos_token_id": [eos, bos], "pad_token_id": bos},
    )
    _write_json(
        d / "special_tokens_map.json",
        {
            "additional_special_tokens": [IM_START, IM_END],
            "eos_token": IM_END,
            "pad_token": ENDOFTEXT,
        },
    )
    _write_json(
        d / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "added_tokens_decoder": {
                str(i): {
                    "content": t,
                    "lstrip": False,
                    "normalized": False,
                    "rstrip": False,
                    "single_word": False,
                    "special": True,
                }
                for t, i in ids.items()
            },
            "additional_special_tokens": [IM_START, IM_END],
            "bos_token": None,
            "eos_token": IM_END,
            "pad_token": ENDOFTEXT,
            "unk_token": None,
            "chat_template": CHAT_TEMPLATE,
            "model_max_length": MAX_POSITIONS,
            "clean_up_tokenization_spaces": False,
            "errors": "replace",
            "split_special_tokens": False,
        },
    )


def make_readable(d: Path) -> None:
    """mkdtemp and safetensors create owner-only files; readers (an engine under
    another uid, a container) need the usual 0755/0644."""
    d.chmod(0o755)
    for f in d.iterdir():
        f.chmod(0o644)


def _recipe(seed: int) -> dict[str, int]:
    return {"format": FORMAT_VERSION, "seed": seed}


def is_built(d: Path, marker: str, recipe: dict[str, int]) -> bool:
    """True if d holds a finished model built from the same recipe."""
    try:
        return bool(json.loads((d / marker).read_text(encoding="utf-8")) == recipe)
    except (OSError, ValueError):
        return False


def build_atomically(
    out_dir: Path, marker: str, recipe: dict[str, int], write: Callable[[Path], None]
) -> Path:
    """Build a model with `write` into out_dir (reusing a complete one built from
    the same recipe) and return its path. Every tiny model is built this way.

    Files are written to a temp dir beside out_dir, made readable, marked with
    the recipe (last: the marker means complete) and renamed into place, so a
    concurrent or interrupted run never leaves a half-written model at out_dir.
    """
    out = Path(out_dir).absolute()
    if is_built(out, marker, recipe):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Same parent => same filesystem, so the rename below is atomic.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write(tmp)
        make_readable(tmp)
        _write_json(tmp / marker, recipe)
        try:
            os.rename(tmp, out)
        except OSError:
            # out exists: another builder won the race, or it is stale/partial/other seed.
            if is_built(out, marker, recipe):
                return out
            # Move the old one aside first so out is never a mix of two builds.
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rename(out, trash / "model")
            shutil.rmtree(trash, ignore_errors=True)
            try:
                os.rename(tmp, out)
            except OSError:
                # A concurrent builder slipped in between; accept its result if it is good.
                if not is_built(out, marker, recipe):
                    raise
    finally:
        # No-op after a successful rename; cleans up after failures and lost races.
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def build_tiny_model(out_dir: Path, seed: int = 0) -> Path:
    """Build the model in out_dir (reusing a complete one) and return its path."""
    return build_atomically(out_dir, MARKER, _recipe(seed), lambda d: _write_model(d, seed))


def build_cli(build: Callable[[Path, int], Path], doc: str | None, argv: list[str] | None) -> int:
    """A tiny model's command line: build (or reuse) it and print its directory."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0] if doc else None)
    ap.add_argument("out_dir", type=Path, help="directory to create the model in")
    ap.add_argument("--seed", type=int, default=0, help="weight RNG seed (default 0)")
    args = ap.parse_args(argv)
    print(build(args.out_dir, args.seed))
    return 0


def main(argv: list[str] | None = None) -> int:
    return build_cli(build_tiny_model, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
