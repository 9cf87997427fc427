"""The Hugging Face "huginn_raven" layout (Huginn-0125, Geiping et al. 2025), both directions.

Directory: ``config.json`` (``model_type: huginn_raven``, ``auto_map`` naming the official
``raven_config_minimal`` / ``raven_modeling_minimal`` code by reference -- the code is not
shipped here), ``model-0000i-of-0000n.safetensors`` shards with ``{"format": "pt"}`` metadata
and ``model.safetensors.index.json``. Export and import stream one tensor / one shard at a time:
host memory holds the source parameters plus at most one shard.

Name map (per block ``transformer.{prelude,core_block,coda}.{i}``; torch Linear weights are
[out, in], ours [in, out]):

  norm_1 / norm_2 / norm_3 / norm_4.weight  <-  norm_attn_in / norm_attn_out / norm_mlp_in / norm_mlp_out.scale
  attn.Wqkv.weight [(N + 2K) H, D]          <-  [q | k | v] of q_DNH, k_DKH, v_DKH, transposed
  attn.qk_bias [2, 1, N, H]                 <-  [q_bias_NH; k_bias_KH]
  attn.proj.weight [D, N H]                 <-  o_NHD
  mlp.fc.weight [2F, D]                     <-  [gate | up] of gate_DF, up_DF, transposed
  mlp.proj.weight [D, F]                    <-  down_FD
  transformer.adapter.weight [D, 2D]        <-  core.adapter_ED (input [s; e] in that order)
  transformer.wte.weight [V, D]             <-  embed.table_VD (lm_head.weight tied, not stored)
  transformer.ln_f.weight                   <-  final_norm.scale (applied twice, as upstream)
  freqs_cis [1, block_size, 1, H/2, 2]      <-  (cos, sin) of the RoPE angles (a buffer upstream)

RoPE: upstream rotates interleaved pairs (x[2i], x[2i+1]) ("complex-like"); ours rotates
(x[i], x[i + H/2]) with the same frequencies theta^(-2i/H). The query/key rows of Wqkv and
qk_bias are permuted within each head on the way in (and back on the way out), which leaves
every attention logit unchanged, so the imported model computes the official function.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np

from looped_jax.config import to_dict
from looped_jax.export.params import ExportError, flatten_params, unflatten_like, write_manifest
from looped_jax.export.safetensors_io import dtype_name, read_safetensors, tensor_sha256, write_safetensors
from looped_jax.models.recurrent_depth import RecurrentDepthConfig

FORMAT_NAME = "huginn_raven"
INDEX_FILE = "model.safetensors.index.json"
NORMS = {"norm_1": "norm_attn_in", "norm_2": "norm_attn_out", "norm_3": "norm_mlp_in", "norm_4": "norm_mlp_out"}
STACKS = {"prelude": "prelude", "core_block": "core.blocks", "coda": "coda"}


# ---------------------------------------------------------------------------------------------
# Config.


def to_huginn_config(cfg: RecurrentDepthConfig, *, block_size: int = 4096, torch_dtype: str = "float32") -> dict:
    """The config.json fields of the published Huginn-0125 config for ``cfg``."""
    if cfg.num_kv_heads != cfg.num_heads:
        raise ExportError(f"huginn_raven has no grouped-query attention: num_kv_heads={cfg.num_kv_heads} != num_heads")
    if cfg.head_dim * cfg.num_heads != cfg.d_model:
        raise ExportError(f"huginn_raven needs head_dim * num_heads == d_model, got {cfg.head_dim} * {cfg.num_heads}")
    published = dict(
        norm_style="sandwich",
        qk_bias=True,
        scale_embeddings=True,
        tie_embeddings=True,
        coda_input_norm=True,
        stable_injection=False,
    )
    for field, want in published.items():
        if getattr(cfg, field, want) != want:
            raise ExportError(
                f"huginn_raven has no model.{field}={getattr(cfg, field)!r} (the published layout has {want!r}); "
                "export this model with --format safetensors or stablehlo instead"
            )
    n = cfg.num_prelude_layers + cfg.num_core_layers + cfg.num_coda_layers
    return {
        "architectures": ["RavenForCausalLM"],
        "auto_map": {  # by reference: the official code lives in the upstream model repository
            "AutoConfig": "tomg-group-umd/huginn-0125--raven_config_minimal.RavenConfig",
            "AutoModelForCausalLM": "tomg-group-umd/huginn-0125--raven_modeling_minimal.RavenForCausalLM",
        },
        "model_type": "huginn_raven",
        "n_embd": cfg.d_model,
        "n_heads": cfg.num_heads,
        "n_layers": n,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "block_size": block_size,
        "vocab_size": cfg.vocab_size,
        "padded_vocab_size": cfg.vocab_size,
        "padding_multiple": 1,
        "tie_embeddings": True,
        "tie_word_embeddings": True,
        "intermediate_size": cfg.mlp_dim,
        "bias": False,
        "architecture_class_name": "RecurrentGPT",
        "block_class_name": "SandwichBlock",
        "norm_class_name": "RMSNorm_llama",
        "norm_eps": cfg.norm_eps,
        "mlp_class_name": "GatedMLP",
        "nonlin_name": "SiLU",
        "init_strategy": "takase",
        "init_orthogonal": False,
        "state_init": "like-init",
        "injection_type": "linear",
        "n_layers_in_prelude": cfg.num_prelude_layers,
        "n_layers_in_recurrent_block": cfg.num_core_layers,
        "n_layers_in_coda": cfg.num_coda_layers,
        "mean_recurrence": cfg.mean_loops,
        "mean_backprop_depth": cfg.grad_steps,
        "sampling_scheme": "poisson-lognormal-filling",
        "qk_bias": True,
        "activation_checkpoint_impl": "per-iteration",
        "rope_base": cfg.rope_theta,
        "torch_dtype": torch_dtype,
        "transformers_version": "4.47.1",
    }


def from_huginn_config(d: dict, **overrides: Any) -> RecurrentDepthConfig:
    """RecurrentDepthConfig of a huginn_raven config.json (published defaults where a field is absent)."""
    if d.get("model_type") != "huginn_raven":
        raise ExportError(f"config.json has model_type={d.get('model_type')!r}; expected 'huginn_raven'")
    checks = {
        "injection_type": "linear",
        "block_class_name": "SandwichBlock",
        "mlp_class_name": "GatedMLP",
        "nonlin_name": "SiLU",
        "bias": False,
        "tie_embeddings": True,
    }
    for field, want in checks.items():
        if d.get(field, want) != want:
            raise ExportError(f"config.json {field}={d[field]!r} is not supported; expected {want!r}")
    if not d.get("qk_bias", True):
        raise ExportError("config.json qk_bias=false is not supported; expected true (the published layout)")
    d_model, heads = int(d.get("n_embd", 5280)), int(d.get("n_heads", d.get("num_attention_heads", 55)))
    if d_model % heads:
        raise ExportError(f"config.json n_embd={d_model} is not divisible by n_heads={heads}")
    kw = dict(
        vocab_size=int(d.get("padded_vocab_size", d.get("vocab_size", 65536))),
        d_model=d_model,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=d_model // heads,
        mlp_dim=int(d.get("intermediate_size", 17920)),
        num_prelude_layers=int(d.get("n_layers_in_prelude", 2)),
        num_core_layers=int(d.get("n_layers_in_recurrent_block", 4)),
        num_coda_layers=int(d.get("n_layers_in_coda", 2)),
        mean_loops=int(d.get("mean_recurrence", 32)),
        grad_steps=max(1, int(d.get("mean_backprop_depth", 8))),
        rope_theta=float(d.get("rope_base", 50_000.0)),
        norm_eps=float(d.get("norm_eps", 1e-6)),
    )
    kw.update(overrides)
    return RecurrentDepthConfig(**kw)


# ---------------------------------------------------------------------------------------------
# RoPE layout and tensors.


def _to_interleaved(x: np.ndarray) -> np.ndarray:
    """[..., H] half-split -> interleaved: out[2i] = x[i], out[2i+1] = x[i + H/2]."""
    h = x.shape[-1] // 2
    return np.stack([x[..., :h], x[..., h:]], axis=-1).reshape(x.shape)


def _from_interleaved(x: np.ndarray) -> np.ndarray:
    return np.concatenate([x[..., 0::2], x[..., 1::2]], axis=-1)


def freqs_cis(head_dim: int, block_size: int, theta: float) -> np.ndarray:
    """The upstream RoPE buffer: [1, block_size, 1, H/2, 2] of (cos, sin), float32."""
    inv = 1.0 / (np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)))
    ang = np.outer(np.arange(block_size, dtype=np.float32), inv.astype(np.float32)).astype(np.float32)
    return np.stack([np.cos(ang), np.sin(ang)], axis=-1)[None, :, None].astype(np.float32)


def _block_out(get: Callable[[str], np.ndarray], ours: str, cfg: RecurrentDepthConfig) -> dict[str, Callable]:
    """{huginn suffix: thunk producing the tensor} for one block (thunks: stream one at a time)."""
    d, n, k, h = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

    def wqkv():
        q = _to_interleaved(get(f"{ours}.attn.q_DNH")).reshape(d, n * h)
        kk = _to_interleaved(get(f"{ours}.attn.k_DKH")).reshape(d, k * h)
        v = get(f"{ours}.attn.v_DKH").reshape(d, k * h)
        return np.concatenate([q, kk, v], axis=1).T

    def qk_bias():
        qb, kb = _to_interleaved(get(f"{ours}.attn.q_bias_NH")), _to_interleaved(get(f"{ours}.attn.k_bias_KH"))
        return np.stack([qb, kb])[:, None]

    out = {
        "attn.Wqkv.weight": wqkv,
        "attn.qk_bias": qk_bias,
        "attn.proj.weight": lambda: get(f"{ours}.attn.o_NHD").reshape(n * h, d).T,
        "mlp.fc.weight": lambda: np.concatenate([get(f"{ours}.mlp.gate_DF"), get(f"{ours}.mlp.up_DF")], axis=1).T,
        "mlp.proj.weight": lambda: get(f"{ours}.mlp.down_FD").T,
    }
    for theirs, mine in NORMS.items():
        out[f"{theirs}.weight"] = lambda m=mine: get(f"{ours}.{m}.scale")
    return out


def huginn_tensors(cfg: RecurrentDepthConfig, get: Callable[[str], np.ndarray], *, block_size: int):
    """[(huginn name, shape, thunk)] in the upstream state_dict order; nothing is computed yet."""
    d, n, k, h, f, v = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim, cfg.vocab_size
    shapes = {
        "attn.Wqkv.weight": ((n + 2 * k) * h, d),
        "attn.qk_bias": (2, 1, n, h),
        "attn.proj.weight": (d, n * h),
        "mlp.fc.weight": (2 * f, d),
        "mlp.proj.weight": (d, f),
        **{f"{t}.weight": (d,) for t in NORMS},
    }
    order = [
        "norm_1.weight",
        "attn.Wqkv.weight",
        "attn.qk_bias",
        "attn.proj.weight",
        "norm_2.weight",
        "mlp.fc.weight",
        "mlp.proj.weight",
        "norm_3.weight",
        "norm_4.weight",
    ]
    out = [("transformer.wte.weight", (v, d), lambda: get("embed.table_VD"))]
    counts = {"prelude": cfg.num_prelude_layers, "core_block": cfg.num_core_layers, "coda": cfg.num_coda_layers}
    for stack in ("prelude", "core_block", "coda"):
        if stack == "core_block":
            out.append(("transformer.adapter.weight", (d, 2 * d), lambda: get("core.adapter_ED").T))
        for i in range(counts[stack]):
            thunks = _block_out(get, f"{STACKS[stack]}.{i}", cfg)
            out += [(f"transformer.{stack}.{i}.{s}", shapes[s], thunks[s]) for s in order]
    out.append(("transformer.ln_f.weight", (d,), lambda: get("final_norm.scale")))
    out.append(("freqs_cis", (1, block_size, 1, h // 2, 2), lambda: freqs_cis(h, block_size, cfg.rope_theta)))
    return out


# ---------------------------------------------------------------------------------------------
# Export.


def export_huginn_raven(
    out_dir: str | Path,
    cfg: RecurrentDepthConfig,
    params: dict,
    *,
    block_size: int = 4096,
    dtype: str = "float32",
    max_shard_bytes: int = 5 * 2**30,
    step: int | None = None,
    source: str | None = None,
    weights: str = "params",
) -> Path:
    """Writes the huginn_raven directory, one shard at a time (host memory: one shard + one tensor).

    ``params``: our pure nested dict (device arrays are fetched one leaf at a time).
    ``dtype``: "float32" or "bfloat16" for the weight tensors (freqs_cis stays float32)."""
    if not isinstance(cfg, RecurrentDepthConfig):
        raise ExportError(f"huginn_raven export needs a recurrent_depth model, got {getattr(cfg, 'name', cfg)!r}")
    np_dtype = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}.get(dtype)
    if np_dtype is None:
        raise ExportError(f"dtype={dtype!r}; expected 'float32' or 'bfloat16'")
    hf_config = to_huginn_config(cfg, block_size=block_size, torch_dtype=dtype)
    flat = flatten_params(params)
    get = lambda name: np.asarray(jax.device_get(flat[name]), np.float32)
    tensors = huginn_tensors(cfg, get, block_size=block_size)
    item = lambda name, shape: math.prod(shape) * (4 if name == "freqs_cis" else np_dtype.itemsize)
    shards: list[list] = [[]]
    size = 0
    for t in tensors:
        nbytes = item(t[0], t[1])
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nbytes
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weight_map, entries, total = {}, {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        data = {}
        for name, shape, thunk in shard:
            arr = np.ascontiguousarray(thunk()).astype(np.float32 if name == "freqs_cis" else np_dtype)
            if arr.shape != tuple(shape):
                raise ExportError(f"internal: {name} has shape {arr.shape}, expected {shape}")
            data[name] = arr
            weight_map[name] = fname
            entries[name] = {
                "shape": list(arr.shape),
                "dtype": dtype_name(arr.dtype),
                "sha256": tensor_sha256(arr),
                "file": fname,
            }
            total += arr.nbytes
        write_safetensors(out / fname, data, {"format": "pt"})
        del data
    (out / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (out / "config.json").write_text(json.dumps(hf_config, indent=2))
    write_manifest(
        out,
        {
            "format": FORMAT_NAME,
            "family": cfg.name,
            "model_config": to_dict(cfg),
            "num_params": int(sum(math.prod(e["shape"]) for k, e in entries.items() if k != "freqs_cis")),
            "source_step": step,
            "source_checkpoint": source,
            "weights": weights,
            "tensors": entries,
        },
    )
    return out


# ---------------------------------------------------------------------------------------------
# Import.


def _shard_files(path: Path) -> tuple[dict[str, str], list[str]]:
    if (path / INDEX_FILE).is_file():
        weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
        return weight_map, sorted(set(weight_map.values()))
    if (path / "model.safetensors").is_file():
        f = read_safetensors(path / "model.safetensors")
        return {k: "model.safetensors" for k in f}, ["model.safetensors"]
    raise ExportError(f"{path} has neither {INDEX_FILE} nor model.safetensors")


def iter_huginn_tensors(path: str | Path) -> Iterator[tuple[str, np.ndarray]]:
    """(name, memory-mapped array) for every tensor, shard by shard."""
    path = Path(path)
    _, files = _shard_files(path)
    for fname in files:
        f = read_safetensors(path / fname)
        for name in f:
            yield name, f[name]


def import_huginn_raven(path: str | Path, **config_overrides: Any) -> tuple[RecurrentDepthConfig, dict]:
    """(config, params) from a huginn_raven directory; params are float32 numpy in our layout.

    Shards are read one at a time (memory-mapped), each tensor converted as it is read."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ExportError(f"{path} has no config.json")
    hf = json.loads((path / "config.json").read_text())
    cfg = from_huginn_config(hf, **config_overrides)
    d, n, k, h, f = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
    flat: dict[str, np.ndarray] = {}
    seen_freqs = None
    for name, arr in iter_huginn_tensors(path):
        a = np.asarray(arr, dtype=np.float32)
        if name == "freqs_cis":
            seen_freqs = a
            continue
        if name == "lm_head.weight":
            flat["__lm_head__"] = a
            continue
        if name == "transformer.wte.weight":
            flat["embed.table_VD"] = a
        elif name == "transformer.ln_f.weight":
            flat["final_norm.scale"] = a
        elif name == "transformer.adapter.weight":
            flat["core.adapter_ED"] = a.T
        else:
            parts = name.split(".")
            if len(parts) < 4 or parts[0] != "transformer" or parts[1] not in STACKS:
                raise ExportError(f"{path}: unexpected tensor {name!r} for the huginn_raven layout")
            ours = f"{STACKS[parts[1]]}.{parts[2]}"
            suffix = ".".join(parts[3:])
            if suffix == "attn.Wqkv.weight":
                if a.shape != ((n + 2 * k) * h, d):
                    raise ExportError(f"{path}: {name} has shape {a.shape}, config needs {((n + 2 * k) * h, d)}")
                w = a.T
                flat[f"{ours}.attn.q_DNH"] = _from_interleaved(w[:, : n * h].reshape(d, n, h))
                flat[f"{ours}.attn.k_DKH"] = _from_interleaved(w[:, n * h : (n + k) * h].reshape(d, k, h))
                flat[f"{ours}.attn.v_DKH"] = w[:, (n + k) * h :].reshape(d, k, h)
            elif suffix == "attn.qk_bias":
                flat[f"{ours}.attn.q_bias_NH"] = _from_interleaved(a[0, 0])
                flat[f"{ours}.attn.k_bias_KH"] = _from_interleaved(a[1, 0])
            elif suffix == "attn.proj.weight":
                flat[f"{ours}.attn.o_NHD"] = a.T.reshape(n, h, d)
            elif suffix == "mlp.fc.weight":
                if a.shape != (2 * f, d):
                    raise ExportError(f"{path}: {name} has shape {a.shape}, config needs {(2 * f, d)}")
                flat[f"{ours}.mlp.gate_DF"], flat[f"{ours}.mlp.up_DF"] = a[:f].T, a[f:].T
            elif suffix == "mlp.proj.weight":
                flat[f"{ours}.mlp.down_FD"] = a.T
            elif suffix.endswith(".weight") and suffix[: -len(".weight")] in NORMS:
                flat[f"{ours}.{NORMS[suffix[: -len('.weight')]]}.scale"] = a
            else:
                raise ExportError(f"{path}: unexpected tensor {name!r} for the huginn_raven layout")
    lm_head = flat.pop("__lm_head__", None)
    if lm_head is not None and not np.array_equal(lm_head, flat.get("embed.table_VD")):
        raise ExportError(f"{path}: lm_head.weight differs from transformer.wte.weight, but the head is tied here")
    if seen_freqs is not None:
        want = freqs_cis(h, seen_freqs.shape[1], cfg.rope_theta)
        if seen_freqs.shape != want.shape or not np.allclose(seen_freqs, want, rtol=1e-5, atol=1e-5):
            raise ExportError(f"{path}: freqs_cis does not match rope_base={cfg.rope_theta} and head_dim={h}")
    from looped_jax.export.params import abstract_params

    params = unflatten_like(
        {k: np.ascontiguousarray(v) for k, v in flat.items()}, abstract_params(cfg), where=str(path)
    )
    return cfg, params
