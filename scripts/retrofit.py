"""Retrofits a pretrained Llama-format transformer into a recurrent-depth model (McLeish et al.
2025, "Teaching Pretrained Language Models to Think Deeper with Retrofitted Recurrence").

    python scripts/retrofit.py --hf_dir path/to/llama --prelude 0,1 --core 2,3,4,5 --coda 20,21 \
        --out retrofitted/ [--mean_loops 32 --grad_steps 8]

Early layers become the prelude, a later span the shared recurrent core, the last layers the
coda (layers in between are dropped). The adapter on [s; e] is initialised to [0; I]: the core's
input is the prelude output e whatever the state s (the paper concatenates e with the core's
output, or random noise at the first step), so one loop computes exactly the original model
restricted to the chosen layers. Blocks keep Llama's pre-norm layout (``norm_style="pre"``), no
q/k bias, no sqrt(d) embedding scale, no norm between core and coda, and Llama's own head (tied
or not). Continue training with the trainer's recurrence curriculum
(``--config.train.mean_loops_ramp_steps N``: the mean loop count rises linearly from
``mean_loops_ramp_start`` to ``model.mean_loops`` over N steps).

Name map (Hugging Face ``LlamaForCausalLM``; torch Linear weights are [out, in]; RoPE: both use
``rotate_half`` on (x[i], x[i + H/2]), so no permutation):

  model.embed_tokens.weight [V, D]                 -> embed.table_VD
  model.layers.{i}.self_attn.q_proj.weight [N H, D] -> {stack}.{j}.attn.q_DNH (k_proj, v_proj: k_DKH, v_DKH)
  model.layers.{i}.self_attn.o_proj.weight [D, N H] -> {stack}.{j}.attn.o_NHD
  model.layers.{i}.mlp.{gate,up}_proj.weight [F, D] -> {stack}.{j}.mlp.{gate,up}_DF;  down_proj -> down_FD
  model.layers.{i}.input_layernorm.weight          -> {stack}.{j}.norm_attn_in.scale
  model.layers.{i}.post_attention_layernorm.weight -> {stack}.{j}.norm_mlp_in.scale
  model.norm.weight                                -> final_norm.scale
  lm_head.weight [V, D]                            -> unembed.w_DV (absent when tie_word_embeddings)

with {stack}.{j} = prelude.{j} / core.blocks.{j} / coda.{j} for the j-th index given to
--prelude / --core / --coda.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from looped_jax.export import ExportError, read_safetensors  # noqa: E402
from looped_jax.export.params import abstract_params, save_params_safetensors, unflatten_like  # noqa: E402
from looped_jax.models.recurrent_depth import RecurrentDepthConfig  # noqa: E402


def _tensors(hf_dir: Path) -> dict:
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (hf_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise ExportError(f"{hf_dir} has neither model.safetensors nor model.safetensors.index.json")
    out = {}
    for name in files:
        f = read_safetensors(hf_dir / name)
        out.update({k: f[k] for k in f})  # memory-mapped: read when used
    return out


def llama_config(hf: dict, prelude, core, coda, **overrides) -> RecurrentDepthConfig:
    """The recurrent-depth config of a Llama config.json and the chosen layer indices."""
    if hf.get("model_type") not in ("llama", None):
        raise ExportError(f"model_type {hf.get('model_type')!r}: only Llama-format checkpoints are supported")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ExportError("Llama checkpoints with attention_bias / mlp_bias are not supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise ExportError(f"hidden_act {hf['hidden_act']!r}: the SwiGLU here uses silu")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise ExportError(f"RoPE scaling {rope} is not supported (plain RoPE only)")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    n = hf["num_hidden_layers"]
    for what, idx in (("prelude", prelude), ("core", core), ("coda", coda)):
        bad = [i for i in idx if not 0 <= i < n]
        if bad:
            raise ExportError(f"--{what} layer indices {bad} are outside 0..{n - 1}")
    if not core:
        raise ExportError("--core needs at least one layer")
    heads = hf["num_attention_heads"]
    return RecurrentDepthConfig(
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads", heads),
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        mlp_dim=hf["intermediate_size"],
        num_prelude_layers=len(prelude),
        num_core_layers=len(core),
        num_coda_layers=len(coda),
        rope_theta=float(theta),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        norm_style="pre",
        qk_bias=False,
        scale_embeddings=False,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        coda_input_norm=False,
        **overrides,
    )


def retrofit_llama(hf_dir: str | Path, prelude, core, coda, **overrides) -> tuple[RecurrentDepthConfig, dict]:
    """(config, params) of the retrofitted model; ``overrides`` set other config fields (mean_loops, ...)."""
    hf_dir = Path(hf_dir)
    hf = json.loads((hf_dir / "config.json").read_text())
    cfg = llama_config(hf, list(prelude), list(core), list(coda), **overrides)
    t = _tensors(hf_dir)
    d, nh, nk, h = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

    def w(name):
        if name not in t:
            raise ExportError(f"{hf_dir}: no tensor {name!r}")
        return np.asarray(t[name], np.float32)

    flat = {"embed.table_VD": w("model.embed_tokens.weight"), "final_norm.scale": w("model.norm.weight")}
    if not cfg.tie_embeddings:
        flat["unembed.w_DV"] = w("lm_head.weight").T
    eye = np.eye(d, dtype=np.float32)
    flat["core.adapter_ED"] = np.concatenate([np.zeros_like(eye), eye])  # [s; e] -> e
    for stack, idx in (("prelude", prelude), ("core.blocks", core), ("coda", coda)):
        for j, i in enumerate(idx):
            a, b = f"model.layers.{i}.", f"{stack}.{j}."
            flat[b + "attn.q_DNH"] = w(a + "self_attn.q_proj.weight").T.reshape(d, nh, h)
            flat[b + "attn.k_DKH"] = w(a + "self_attn.k_proj.weight").T.reshape(d, nk, h)
            flat[b + "attn.v_DKH"] = w(a + "self_attn.v_proj.weight").T.reshape(d, nk, h)
            flat[b + "attn.o_NHD"] = w(a + "self_attn.o_proj.weight").T.reshape(nh, h, d)
            flat[b + "mlp.gate_DF"] = w(a + "mlp.gate_proj.weight").T
            flat[b + "mlp.up_DF"] = w(a + "mlp.up_proj.weight").T
            flat[b + "mlp.down_FD"] = w(a + "mlp.down_proj.weight").T
            flat[b + "norm_attn_in.scale"] = w(a + "input_layernorm.weight")
            flat[b + "norm_mlp_in.scale"] = w(a + "post_attention_layernorm.weight")
    flat = {k: np.ascontiguousarray(v) for k, v in flat.items()}
    return cfg, unflatten_like(flat, abstract_params(cfg), where=str(hf_dir))


def _indices(text: str) -> list[int]:
    if not text:
        return []
    out = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    return out


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf_dir", required=True, help="Hugging Face Llama checkpoint (config.json + safetensors)")
    ap.add_argument("--prelude", default="", help="layer indices, e.g. 0,1 or 0-1")
    ap.add_argument("--core", required=True, help="layer indices of the recurrent block, e.g. 10-13")
    ap.add_argument("--coda", default="", help="layer indices, e.g. 20,21")
    ap.add_argument("--mean_loops", type=int, default=32)
    ap.add_argument("--grad_steps", type=int, default=8)
    ap.add_argument("--out", required=True, help="output dir: params-only safetensors + manifest.json")
    a = ap.parse_args(argv)
    cfg, params = retrofit_llama(
        a.hf_dir,
        _indices(a.prelude),
        _indices(a.core),
        _indices(a.coda),
        mean_loops=a.mean_loops,
        grad_steps=a.grad_steps,
    )
    out = save_params_safetensors(a.out, cfg, params, source=str(a.hf_dir))
    print(f"retrofitted {a.hf_dir} -> {out} (prelude {a.prelude}, core {a.core}, coda {a.coda})", flush=True)
    return Path(out)


if __name__ == "__main__":
    main()
