"""Build a tiny random LoRA adapter for the tiny Qwen2 (tools/tiny_model.py).

A PEFT-format adapter, as vLLM's `--lora-modules NAME=PATH` loads it:
adapter_config.json and adapter_model.safetensors with seeded random A and B
matrices for the attention's q_proj and v_proj of every layer. Its shapes come
from the base model's config.json, so it fits whatever tiny_model.py built.
B is far from zero (a trained adapter's is too): the adapter really changes
the answers, which lets a test tell the adapter's from the base model's.

Only numpy and safetensors are used (the project's light venv runs it).

Usage: ``python tools/tiny_lora.py BASE_MODEL_DIR OUT_DIR [--rank 8] [--seed 1]``;
prints the adapter directory.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file
from tiny_model import make_readable  # tools/ is first on sys.path

__all__ = ["build_tiny_lora", "main"]

TARGETS = ("q_proj", "v_proj")
A_STD = 0.1
B_STD = 0.1
"""With rank 8 and alpha 16 the update's entries are about 0.06, three times
the base model's 0.02 init: the adapter's greedy answers differ from the base's."""


def _shapes(config: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """(out, in) of each target projection."""
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads", heads))
    head_dim = int(config.get("head_dim") or hidden // heads)
    return {"q_proj": (heads * head_dim, hidden), "v_proj": (kv_heads * head_dim, hidden)}


def build_tiny_lora(base_dir: Path, out_dir: Path, rank: int = 8, seed: int = 1) -> Path:
    """Write the adapter for the model in `base_dir` into `out_dir`; return it."""
    config = json.loads((Path(base_dir) / "config.json").read_text(encoding="utf-8"))
    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray[Any, np.dtype[np.float32]]] = {}
    for layer in range(int(config["num_hidden_layers"])):
        for target, (out_features, in_features) in _shapes(config).items():
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{target}"
            a = rng.normal(0.0, A_STD, (rank, in_features)).astype(np.float32)
            b = rng.normal(0.0, B_STD, (out_features, rank)).astype(np.float32)
            tensors[f"{prefix}.lora_A.weight"] = a
            tensors[f"{prefix}.lora_B.weight"] = b
    out = Path(out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(Path(base_dir).absolute()),
        "r": rank,
        "lora_alpha": 2 * rank,
        "lora_dropout": 0.0,
        "target_modules": list(TARGETS),
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
    }
    (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
    make_readable(out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("base_dir", type=Path, help="the tiny model's directory (tools/tiny_model.py)")
    ap.add_argument("out_dir", type=Path, help="directory to write the adapter in")
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    ap.add_argument("--seed", type=int, default=1, help="weight RNG seed (default 1)")
    args = ap.parse_args(argv)
    print(build_tiny_lora(args.base_dir, args.out_dir, rank=args.rank, seed=args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
