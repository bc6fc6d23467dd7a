"""Build a tiny random-weight cross-encoder that vLLM's CPU build serves with its
pooling runner: /classify, /pooling, /score and /rerank.

It is the tiny Qwen2 of tools/tiny_model.py (same tokenizer, same layers) with
a sequence-classification head instead of the language-model head:
``Qwen2ForSequenceClassification`` with one label, which vLLM serves as a
classifier and, having one label, as a cross-encoder for scoring and reranking.
Everything is made offline, with numpy, safetensors and tokenizers only.

Usage: ``python tools/tiny_pooling.py OUT_DIR [--seed N]``; prints the model directory.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_model import FORMAT_VERSION as BASE_FORMAT
from tiny_model import HIDDEN, build_atomically, build_cli, build_tiny_model

__all__ = ["MARKER", "build_tiny_pooling_model", "main"]

FORMAT_VERSION = 1
MARKER = ".kscope-tiny-pooling.json"
"""Written last, so its presence means every other file is complete."""
SCORE_STD = 0.2
"""Wide enough that different inputs get clearly different scores."""


def _recipe(seed: int) -> dict[str, int]:
    # The base model's format too: a pooling model made from an older one is stale.
    return {"format": FORMAT_VERSION, "base_format": BASE_FORMAT, "seed": seed}


def _write_model(d: Path, seed: int) -> None:
    """The causal model's files in `d`, turned into a one-label classifier."""
    with tempfile.TemporaryDirectory(prefix=".causal-", dir=d.parent) as scratch:
        causal = build_tiny_model(Path(scratch) / "causal", seed=seed)
        for f in causal.iterdir():
            if f.is_file() and not f.name.startswith("."):
                shutil.copy(f, d / f.name)
    weights = load_file(str(d / "model.safetensors"))
    del weights["lm_head.weight"]
    rng = np.random.default_rng(seed + 1)
    weights["score.weight"] = (rng.standard_normal((1, HIDDEN)) * SCORE_STD).astype(np.float32)
    save_file(weights, str(d / "model.safetensors"), metadata={"format": "pt"})
    config: dict[str, Any] = json.loads((d / "config.json").read_text(encoding="utf-8"))
    config["architectures"] = ["Qwen2ForSequenceClassification"]
    config["num_labels"] = 1
    config["id2label"] = {"0": "LABEL_0"}
    config["label2id"] = {"LABEL_0": 0}
    (d / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (d / "generation_config.json").unlink(missing_ok=True)


def build_tiny_pooling_model(out_dir: Path, seed: int = 0) -> Path:
    """Build the model in out_dir (reusing a complete one) and return its path."""
    return build_atomically(out_dir, MARKER, _recipe(seed), lambda d: _write_model(d, seed))


def main(argv: list[str] | None = None) -> int:
    return build_cli(build_tiny_pooling_model, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
