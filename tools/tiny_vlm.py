"""Build a tiny random-weight Qwen2-VL model that MLX-VLM loads and serves.

The MLX tests need a real vision-language model without a model hub, so everything
is made offline, like tools/tiny_model.py (whose corpus it reuses): a byte-level BPE
tokenizer with Qwen2-VL's special tokens, a Qwen2VLImageProcessor config sized for
small images, a Qwen2-VL chat template, and weights shaped and named by mlx-vlm's
own model class (so loading needs no renaming), filled from a seeded numpy generator.

Sizes: hidden 64, 2 layers, a 1-block vision tower; images are resized to at most
112x112 pixels, i.e. at most 16 image tokens. Loads in well under a second and
generates about a thousand tokens a second on one CPU core.

As in tiny_model.py, a constant "bias channel" in the residual stream lets the head
push special tokens and unprintable pieces ~30 logits down, so replies are clean
ASCII that never ends by itself (finish_reason "length" unless `stop` matches), and
the attention value path is scaled up so that images really change the output.

Usage: ``python tools/tiny_vlm.py OUT_DIR [--seed N]``; prints the model directory.
Needs mlx-vlm (the `mlx` extra).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from tiny_model import CORPUS, build_atomically, build_cli  # tools/ is first on sys.path
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

__all__ = ["MARKER", "build_tiny_vlm", "main"]

FORMAT_VERSION = 1
MARKER = ".kscope-tiny-vlm.json"
"""Written last, so its presence means every other file is complete."""

HIDDEN = 64
HEADS = 4
KV_HEADS = 2
HEAD_DIM = HIDDEN // HEADS
LAYERS = 2
INTERMEDIATE = 128
MAX_POSITIONS = 32768
TARGET_VOCAB = 1024
# Multimodal RoPE splits head_dim/2 frequencies over (time, height, width), as
# Qwen2-VL's [16, 24, 24] does for head_dim 128.
MROPE_SECTION = [2, 3, 3]

VISION_EMBED = 32
VISION_HEADS = 2
VISION_DEPTH = 1
PATCH = 14
MERGE = 2
TEMPORAL_PATCH = 2
MIN_PIXELS = (PATCH * MERGE) ** 2  # one merged token
MAX_PIXELS = (PATCH * MERGE * 4) ** 2  # 112x112: at most 16 image tokens

INIT_STD = 0.02
HEAD_STD = 0.2
# The attention value path and the vision tower are wider than INIT_STD so that what
# a token attends to (an image) moves the logits as much as the token itself does.
VALUE_STD = 0.2
VISION_STD = 0.1
BIAS_DIM = 0
BIAS_VALUE = 0.2
BAN_WEIGHT = -100.0

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen2-VL's template without its default system prompt, so prompts stay predictable.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

F32Array = np.ndarray[Any, np.dtype[np.float32]]


def _train_tokenizer() -> Tokenizer:
    """A byte-level BPE on the shared corpus, with Qwen2-VL's special tokens first."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TARGET_VOCAB,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([CORPUS] * 4, trainer=trainer)
    return tok


def _banned_ids(tok: Tokenizer) -> list[int]:
    """Special tokens and pieces that are not printable ASCII on their own."""
    banned = []
    for i in range(tok.get_vocab_size()):
        text = tok.decode([i], skip_special_tokens=False)
        clean = text.isascii() and all(c.isprintable() or c == "\n" for c in text)
        if tok.id_to_token(i) in SPECIAL_TOKENS or not text or not clean:
            banned.append(i)
    return banned


def _config(vocab: int, ids: dict[str, int]) -> dict[str, Any]:
    """config.json in Hugging Face's Qwen2-VL layout; sizes stay ints because
    transformers validates them strictly and they feed shape arithmetic."""
    return {
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "model_type": "qwen2_vl",
        "vocab_size": vocab,
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "hidden_act": "silu",
        "max_position_embeddings": MAX_POSITIONS,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "rope_scaling": {"type": "mrope", "mrope_section": MROPE_SECTION},
        "tie_word_embeddings": False,
        "use_sliding_window": False,
        "sliding_window": MAX_POSITIONS,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|vision_pad|>"],
        "torch_dtype": "float32",
        "vision_config": {
            "model_type": "qwen2_vl",
            "depth": VISION_DEPTH,
            "embed_dim": VISION_EMBED,
            "hidden_size": HIDDEN,
            "num_heads": VISION_HEADS,
            "mlp_ratio": 2,
            "in_channels": 3,
            "in_chans": 3,
            "patch_size": PATCH,
            "spatial_patch_size": PATCH,
            "spatial_merge_size": MERGE,
            "temporal_patch_size": TEMPORAL_PATCH,
        },
    }


def _weights(config: dict[str, Any], banned: list[int], seed: int) -> dict[str, F32Array]:
    """Every parameter of mlx-vlm's Qwen2-VL model, by its own names and shapes."""
    from mlx.utils import tree_flatten
    from mlx_vlm.models import qwen2_vl
    from mlx_vlm.utils import update_module_configs

    # The construction mlx_vlm.utils.load_model does, so names and shapes match.
    params = json.loads(json.dumps(config))  # from_dict adds text_config to its argument
    model_config = qwen2_vl.ModelConfig.from_dict(params)
    model_config = update_module_configs(model_config, qwen2_vl, params, ["text", "vision"])
    model = qwen2_vl.Model(model_config)
    shapes = {name: tuple(p.shape) for name, p in tree_flatten(model.parameters())}
    rng = np.random.default_rng(seed)
    weights: dict[str, F32Array] = {}
    for name, shape in sorted(shapes.items()):
        if name.endswith("bias"):
            weights[name] = np.zeros(shape, np.float32)
        elif len(shape) == 1:  # RMSNorm / LayerNorm scales start at 1
            weights[name] = np.ones(shape, np.float32)
        else:
            std = INIT_STD
            if name.startswith("vision_tower"):
                std = VISION_STD
            elif name.endswith(("v_proj.weight", "o_proj.weight")):
                std = VALUE_STD
            elif name.endswith("lm_head.weight"):
                std = HEAD_STD
            weights[name] = (rng.standard_normal(shape) * std).astype(np.float32)
    _steer(weights, banned)
    return weights


def _steer(w: dict[str, F32Array], banned: list[int]) -> None:
    """Make hidden dim BIAS_DIM a constant no layer reads or writes, and let the head
    use it to push banned tokens' logits far down (Qwen2's head has no bias)."""
    lm = "language_model.model"
    w[f"{lm}.embed_tokens.weight"][:, BIAS_DIM] = BIAS_VALUE
    for i in range(LAYERS):
        p = f"{lm}.layers.{i}"
        for reader in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                       "mlp.gate_proj", "mlp.up_proj"):  # fmt: skip
            w[f"{p}.{reader}.weight"][:, BIAS_DIM] = 0.0
        for writer in ("self_attn.o_proj", "mlp.down_proj"):
            w[f"{p}.{writer}.weight"][BIAS_DIM, :] = 0.0
    # Image features replace token embeddings at image positions: same channel value.
    merger_out = "vision_tower.merger.mlp.2"
    w[f"{merger_out}.weight"][BIAS_DIM, :] = 0.0
    w[f"{merger_out}.bias"][BIAS_DIM] = BIAS_VALUE
    head = w["language_model.lm_head.weight"]
    head[:, BIAS_DIM] = 0.0
    head[banned, BIAS_DIM] = BAN_WEIGHT


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def _preprocessor_config() -> dict[str, Any]:
    return {
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2VLProcessor",
        "do_resize": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "do_convert_rgb": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "min_pixels": MIN_PIXELS,
        "max_pixels": MAX_PIXELS,
        "size": {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS},
        "patch_size": PATCH,
        "temporal_patch_size": TEMPORAL_PATCH,
        "merge_size": MERGE,
    }


def _added_token(content: str) -> dict[str, Any]:
    flags = ("lstrip", "normalized", "rstrip", "single_word")
    return {"content": content, **dict.fromkeys(flags, False), "special": True}


def _write_model(d: Path, seed: int) -> None:
    """Write every model file into the (empty) directory d, marker last."""
    import mlx.core as mx

    tok = _train_tokenizer()
    vocab = tok.get_vocab_size()
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    config = _config(vocab, ids)
    weights = _weights(config, _banned_ids(tok), seed)
    mx.save_safetensors(
        str(d / "model.safetensors"),
        {k: mx.array(v) for k, v in weights.items()},
        metadata={"format": "mlx"},
    )
    tok.save(str(d / "tokenizer.json"))
    _write_json(d / "config.json", config)
    _write_json(
        d / "generation_config.json",
        {"bos_token_id": ids["<|endoftext|>"], "eos_token_id": [ids["<|im_end|>"]]},
    )
    _write_json(d / "preprocessor_config.json", _preprocessor_config())
    (d / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    _write_json(
        d / "tokenizer_config.json",
        {
            "tokenizer_class": "Qwen2TokenizerFast",
            "added_tokens_decoder": {str(i): _added_token(t) for t, i in ids.items()},
            "additional_special_tokens": SPECIAL_TOKENS[1:],
            "bos_token": None,
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "unk_token": None,
            "chat_template": CHAT_TEMPLATE,
            "model_max_length": MAX_POSITIONS,
            "clean_up_tokenization_spaces": False,
            "errors": "replace",
            "split_special_tokens": False,
        },
    )


def _recipe(seed: int) -> dict[str, int]:
    return {"format": FORMAT_VERSION, "seed": seed}


def build_tiny_vlm(out_dir: Path, seed: int = 0) -> Path:
    """Build the model in out_dir (reusing a complete one) and return its path."""
    return build_atomically(out_dir, MARKER, _recipe(seed), lambda d: _write_model(d, seed))


def main(argv: list[str] | None = None) -> int:
    return build_cli(build_tiny_vlm, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
