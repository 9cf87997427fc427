"""The official HRM (sapientinc/HRM) and TRM (SamsungSAILMontreal/TinyRecursiveModels) training
checkpoints, both directions.

A checkpoint directory holds ``step_<N>`` (``torch.save(model.state_dict())`` of the
``torch.compile``-d ``ACTLossHead``, hence keys ``_orig_mod.model.inner.<name>``) and
``all_config.yaml`` (``PretrainConfig.model_dump()``; the model hyper-parameters are its ``arch``
section). Reading needs no torch (``looped_jax.export.torch_pickle``'s restricted unpickler);
writing uses torch when importable, else ``step_<N>.safetensors`` with the same names.

Name map (``inner.`` names after stripping ``_orig_mod.`` / ``module.`` / ``model.``; torch
Linear weights are [out, in], ours [in, out]; per block ``{H,L}_level.layers.{i}`` <-> ours
``{h,l}_blocks.{i}`` (HRM) or ``L_level.layers.{i}`` <-> ``blocks.{i}`` (TRM)):

  embed_tokens.embedding_weight [V, D]      <-> embed_VD
  lm_head.weight [V, D]                     <-> lm_head_DV (transposed)
  q_head.weight [2, D], q_head.bias [2]     <-> q_head_D2 (transposed), q_bias_2 (halt, continue)
  puzzle_emb.weights [ids, E]               <-> puzzle_emb (a sparse-embedding buffer upstream)
  embed_pos.embedding_weight [P + T, D]     <-> pos_LD (pos_encodings: learned)
  H_init, L_init [D] (buffers)              <-> config ``init_states`` (HRM z_H, z_L; TRM y, z)
  self_attn.qkv_proj.weight [3 N H, D]      <-> rows [q | k | v], each head's H rows contiguous:
                                                q_DNH, k_DKH, v_DKH reshaped to [D, N H], transposed
  self_attn.o_proj.weight [D, N H]          <-> o_NHD reshaped to [N H, D], transposed
  mlp.gate_up_proj.weight [2F, D]           <-> [gate | up] of gate_DF, up_DF, transposed
  mlp.down_proj.weight [D, F]               <-> down_FD
  mlp_t.gate_up_proj.weight [2F', P + T]    <-> [seq_gate_LF | seq_up_LF] transposed (TRM mlp_t)
  mlp_t.down_proj.weight [P + T, F']        <-> seq_down_FL

RoPE: both rotate the halves (x[i], x[i + H/2]) with frequencies theta^(-2i/H) (upstream's
``rotate_half``), so no permutation is needed. Not stored upstream: the RoPE tables
(non-persistent) and the data-set sizes. ``vocab_size`` and ``num_puzzle_ids`` come from the
tensors, ``seq_len`` from (in order) the ``seq_len`` argument, the data set's ``dataset.json``
(``dataset=``, or ``<data_path>/train/dataset.json`` when that exists), the ``looped_jax``
section our exports add to all_config.yaml, or the learned-position / mlp_t tensors' shapes.

Config map (arch -> ours): hidden_size -> d_model, num_heads (head_dim = hidden_size /
num_heads), expansion -> mlp_dim (and TRM seq_mlp_dim), puzzle_emb_ndim -> puzzle_emb_dim,
pos_encodings, rope_theta, rms_norm_eps -> norm_eps, halt_max_steps, halt_exploration_prob,
forward_dtype -> dtype, loss.loss_type -> loss_type; HRM: H/L_cycles -> h/l_cycles, H/L_layers
-> num_h/l_layers; TRM: H_cycles -> recursions (T), L_cycles -> latent_steps (n), L_layers ->
num_layers, puzzle_emb_len, mlp_t -> mixer "mlp" (written back with ``pos_encodings: none``
when the positions are unused). TRM's ``no_ACT_continue: False`` has no equivalent here.

EMA: TRM's pretrain.py with ``ema: True`` saves the EMA copy of the weights; such checkpoints
import as ``weights="ema_params"``. A checkpoint dict that carries its own EMA shadow
(``{"model": state_dict, "ema": shadow}``, EMAHelper names) imports the shadow where present
(``ema=None``) or when asked (``ema=True``); ``ema=False`` takes the raw weights.
"""

from __future__ import annotations

import json
import re
import types
from pathlib import Path
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np

from looped_jax.export.params import abstract_params, flatten_params, unflatten_like
from looped_jax.export.safetensors_io import ExportError
from looped_jax.export.torch_pickle import read_state_dict, write_state_dict
from looped_jax.models.hrm import HRMConfig, RecursiveReasoner, swiglu_hidden
from looped_jax.models.trm import TRMConfig

CONFIG_FILE = "all_config.yaml"
PREFIX = "_orig_mod.model.inner."  # torch.compile(ACTLossHead(model)).state_dict()
ARCH_NAMES = {
    "hrm": "hrm.hrm_act_v1@HierarchicalReasoningModel_ACTV1",
    "trm": "recursive_reasoning.trm@TinyRecursiveReasoningModel_ACTV1",
}
LOSS_TYPES = {"stablemax_cross_entropy": "stablemax", "softmax_cross_entropy": "softmax"}
PRETRAIN_DEFAULTS = {  # required PretrainConfig fields we have no record of: the published cfg_pretrain.yaml
    "global_batch_size": 768,
    "epochs": 100000,
    "lr": 1e-4,
    "lr_min_ratio": 1.0,
    "lr_warmup_steps": 2000,
    "weight_decay": 0.1,
    "beta1": 0.9,
    "beta2": 0.95,
    "puzzle_emb_lr": 1e-2,
    "puzzle_emb_weight_decay": 0.1,
}
EMA_KEYS = ("ema", "ema_state_dict", "ema_shadow", "shadow")
MODEL_KEYS = ("model", "state_dict", "model_state_dict")


class ImportedReasoner(NamedTuple):
    model_cfg: Any  # HRMConfig | TRMConfig
    params: dict  # pure nested dict of float32 numpy arrays (model_from_params takes it)
    weights: str  # "params" or "ema_params"
    step: int | None
    arch: dict  # the all_config.yaml arch section as read


# ---------------------------------------------------------------------------------------------
# Reading.


def _yaml():
    try:
        import yaml
    except ImportError as e:  # pragma: no cover - pyyaml ships with the dependencies
        raise ExportError("reading / writing all_config.yaml needs pyyaml (pip install pyyaml)") from e
    return yaml


def _find_checkpoint(path: Path) -> Path:
    if path.is_file():
        return path
    if not path.is_dir():
        raise ExportError(f"checkpoint {str(path)!r} does not exist")
    steps = {}
    for p in path.iterdir():
        m = re.fullmatch(r"step_(\d+)(\.safetensors)?", p.name)
        if m and p.is_file():
            steps[int(m.group(1))] = p
    if not steps:
        raise ExportError(f"{path} holds no step_<N> checkpoint file")
    return steps[max(steps)]


def _strip(name: str) -> str:
    for prefix in ("_orig_mod.", "module."):
        while name.startswith(prefix):
            name = name[len(prefix) :]
    for prefix in ("model.", "inner."):
        if name.startswith(prefix):
            name = name[len(prefix) :]
    return name


def _is_tensor_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, np.ndarray) for v in obj.values())


def _state_and_ema(obj: Any, where: str) -> tuple[dict, dict | None]:
    if _is_tensor_dict(obj):
        return obj, None
    if isinstance(obj, dict):
        model = next((obj[k] for k in MODEL_KEYS if _is_tensor_dict(obj.get(k))), None)
        ema = next((obj[k] for k in EMA_KEYS if _is_tensor_dict(obj.get(k))), None)
        if model is not None:
            return model, ema
    raise ExportError(f"{where} holds no state_dict (a dict of tensors, or one under {MODEL_KEYS})")


def _dataset_meta(dataset: Any, cfg: dict, base: Path) -> dict | None:
    if isinstance(dataset, dict):
        return dataset
    candidates = []
    if dataset is not None:
        d = Path(dataset)
        candidates = [d, d / "dataset.json", d / "train" / "dataset.json"]
    else:
        paths = cfg.get("data_paths") or [cfg.get("data_path")]
        for p in paths if isinstance(paths, list) else [paths]:
            if isinstance(p, str) and p:
                candidates += [Path(p) / "train" / "dataset.json", base / p / "train" / "dataset.json"]
    for c in candidates:
        if c.is_file():
            return json.loads(c.read_text())
    if dataset is not None:
        raise ExportError(f"no dataset.json at {dataset} (nor in its train/ folder)")
    return None


def _puzzle_error(have: int, want: int, src: str) -> ExportError:
    return ExportError(
        f"puzzle_emb size mismatch: the checkpoint's puzzle_emb has {have} rows (num_puzzle_identifiers of the "
        f"data set it was trained on) but {src} has {want} puzzle identifiers, so puzzle ids would pick the wrong "
        "rows. Use the data set the checkpoint was trained on (same build and augmentation), or pass "
        "resize_puzzle_emb=True (scripts: --resize_puzzle_emb) to replace the table by its mean row, as the official "
        "load_checkpoint does, and fine-tune the puzzle embeddings."
    )


def import_official(
    checkpoint: str | Path,
    *,
    config: str | Path | dict | None = None,
    dataset: str | Path | dict | None = None,
    seq_len: int | None = None,
    num_puzzle_ids: int | None = None,
    resize_puzzle_emb: bool = False,
    ema: bool | None = None,
) -> ImportedReasoner:
    """An official HRM / TRM checkpoint (file ``step_N`` or its directory) as (our config, params).

    ``config``: all_config.yaml (default: beside the checkpoint) or its parsed dict. ``dataset``:
    the data set to run on (a ``dataset.json``, its directory or a dict with ``seq_len``,
    ``vocab_size``, ``num_puzzle_identifiers``); ``num_puzzle_ids`` the same check by number. A
    puzzle table whose row count differs is an error unless ``resize_puzzle_emb``."""
    ckpt = _find_checkpoint(Path(checkpoint))
    if isinstance(config, dict):
        cfg = config
    else:
        cfg_path = Path(config) if config is not None else ckpt.parent / CONFIG_FILE
        if not cfg_path.is_file():
            raise ExportError(f"no {CONFIG_FILE} at {cfg_path} (pass config=...)")
        cfg = _yaml().safe_load(cfg_path.read_text())
    arch = cfg.get("arch") if isinstance(cfg, dict) else None
    if not isinstance(arch, dict) or "name" not in arch:
        raise ExportError(f"{CONFIG_FILE} of {ckpt} has no arch section with a name")
    cls = arch["name"].split("@")[-1]
    family = {"HierarchicalReasoningModel_ACTV1": "hrm", "TinyRecursiveReasoningModel_ACTV1": "trm"}.get(cls)
    if family is None:
        raise ExportError(f"arch.name {arch['name']!r} is neither the official HRM nor TRM (have {ARCH_NAMES})")

    state, shadow = _state_and_ema(read_state_dict(ckpt), str(ckpt))
    weights = "ema_params" if cfg.get("ema") else "params"
    if ema and shadow is None:
        raise ExportError(f"{ckpt} carries no EMA shadow (keys {EMA_KEYS}); ema=True cannot be honoured")
    if shadow is not None and ema is not False:
        state = {**state, **shadow}  # the shadow holds parameters only; buffers stay
        weights = "ema_params"
    t = {_strip(k): np.asarray(v) for k, v in state.items()}

    local = cfg.get("looped_jax") or {}
    meta = _dataset_meta(dataset, cfg, ckpt.parent)
    p_len = _prefix_len(arch, family)
    seq = seq_len or (meta or {}).get("seq_len") or local.get("seq_len")
    if seq is None and "embed_pos.embedding_weight" in t:
        seq = t["embed_pos.embedding_weight"].shape[0] - p_len
    if seq is None and "L_level.layers.0.mlp_t.down_proj.weight" in t:
        seq = t["L_level.layers.0.mlp_t.down_proj.weight"].shape[0] - p_len
    if seq is None:
        raise ExportError(
            f"{ckpt}: the puzzle length is not stored with RoPE; pass seq_len=... or dataset=<its dataset.json>"
        )
    vocab = t["embed_tokens.embedding_weight"].shape[0]
    if meta and meta.get("vocab_size", vocab) != vocab:
        raise ExportError(f"checkpoint vocab_size {vocab} != the data set's vocab_size {meta['vocab_size']}")

    pe_dim = int(arch.get("puzzle_emb_ndim", 0))
    n_ids = 1
    want_ids = num_puzzle_ids or (meta or {}).get("num_puzzle_identifiers")
    if pe_dim > 0:
        table = t["puzzle_emb.weights"]
        if table.shape[1] != pe_dim:
            raise ExportError(f"puzzle_emb.weights has width {table.shape[1]}, arch.puzzle_emb_ndim is {pe_dim}")
        if want_ids is not None and want_ids != table.shape[0]:
            if not resize_puzzle_emb:
                src = "num_puzzle_ids" if num_puzzle_ids else "the data set"
                raise _puzzle_error(table.shape[0], want_ids, src)
            table = np.broadcast_to(table.mean(0, keepdims=True), (want_ids, pe_dim)).copy()
            t["puzzle_emb.weights"] = table
        n_ids = table.shape[0]

    model_cfg = _config_from_arch(arch, family, t, cfg, vocab=vocab, seq_len=int(seq), num_ids=n_ids)
    flat = _ours_from_theirs(model_cfg, family, t)
    params = unflatten_like(flat, abstract_params(model_cfg), where=str(ckpt))
    m = re.fullmatch(r"step_(\d+)(\.safetensors)?", ckpt.name)
    return ImportedReasoner(model_cfg, params, weights, int(m.group(1)) if m else None, arch)


def _prefix_len(arch: dict, family: str) -> int:
    ceil = -(-int(arch.get("puzzle_emb_ndim", 0)) // int(arch["hidden_size"]))
    if family == "trm":
        return int(arch.get("puzzle_emb_len", 16)) or ceil
    return ceil


def _config_from_arch(arch: dict, family: str, t: dict, cfg: dict, *, vocab: int, seq_len: int, num_ids: int):
    d, heads = int(arch["hidden_size"]), int(arch["num_heads"])
    if d % heads:
        raise ExportError(f"hidden_size {d} is not a multiple of num_heads {heads}")
    layer = "L_level.layers.0."
    mlp_dim = t[layer + "mlp.down_proj.weight"].shape[1]
    if mlp_dim != swiglu_hidden(d, float(arch["expansion"])):
        raise ExportError(f"mlp.down_proj has width {mlp_dim}; expansion {arch['expansion']} gives another")
    pos = arch.get("pos_encodings", "rope")
    loss = (arch.get("loss") or {}).get("loss_type", "stablemax_cross_entropy")
    if loss not in LOSS_TYPES:
        raise ExportError(f"loss_type {loss!r} has no equivalent here; expected one of {sorted(LOSS_TYPES)}")
    init = tuple(tuple(float(x) for x in np.asarray(t[n], np.float32)) for n in ("H_init", "L_init"))
    common = dict(
        vocab_size=vocab,
        seq_len=seq_len,
        num_puzzle_ids=num_ids,
        puzzle_emb_dim=int(arch.get("puzzle_emb_ndim", 0)),
        d_model=d,
        num_heads=heads,
        head_dim=d // heads,
        mlp_dim=mlp_dim,
        rope_theta=float(arch.get("rope_theta", 10000.0)),
        norm_eps=float(arch.get("rms_norm_eps", 1e-5)),
        halt_max_steps=int(arch["halt_max_steps"]),
        halt_exploration_prob=float(arch["halt_exploration_prob"]),
        loss_type=LOSS_TYPES[loss],
        dtype=str(arch.get("forward_dtype", "bfloat16")),
        init_states=init,
    )
    local = cfg.get("looped_jax") or {}
    if "init_state_seed" in local:  # our export of seed-drawn states: restore the seed form exactly
        common["init_state_seed"] = int(local["init_state_seed"])
        if local.get("init_states_from_seed"):  # equal as stored (H_init is in forward_dtype upstream)
            probe = _build_cfg(family, arch, {**common, "init_states": ()}, pos, t)
            stored = [np.asarray(t[n]) for n in ("H_init", "L_init")]
            if all(np.array_equal(z.astype(s.dtype), s) for z, s in zip(_init_states(probe), stored, strict=True)):
                common["init_states"] = ()
    return _build_cfg(family, arch, common, pos, t)


def _build_cfg(family: str, arch: dict, common: dict, pos: str, t: dict):
    if family == "hrm":
        if pos not in ("rope", "learned"):
            raise ExportError(f"HRM pos_encodings {pos!r}; expected 'rope' or 'learned'")
        return HRMConfig(
            pos_encoding=pos,
            num_h_layers=int(arch["H_layers"]),
            num_l_layers=int(arch["L_layers"]),
            h_cycles=int(arch["H_cycles"]),
            l_cycles=int(arch["L_cycles"]),
            **common,
        )
    if arch.get("no_ACT_continue", True) is not True:
        raise ExportError("TRM with no_ACT_continue=False (halting on q_halt > q_continue) has no equivalent here")
    mlp_t = bool(arch.get("mlp_t", False))
    if pos not in ("rope", "learned") and not (mlp_t and pos == "none"):
        raise ExportError(f"TRM pos_encodings {pos!r}; expected 'rope' or 'learned' ('none' only with mlp_t)")
    seq_mlp = t["L_level.layers.0.mlp_t.down_proj.weight"].shape[1] if mlp_t else 0
    if seq_mlp == swiglu_hidden(_prefix_len(arch, "trm") + common["seq_len"], 4):
        seq_mlp = 0  # our default resolution gives the same width
    return TRMConfig(
        pos_encoding="rope" if pos == "none" else pos,
        num_layers=int(arch["L_layers"]),
        latent_steps=int(arch["L_cycles"]),
        recursions=int(arch["H_cycles"]),
        puzzle_emb_len=_prefix_len(arch, "trm"),
        mixer="mlp" if mlp_t else "attention",
        seq_mlp_dim=seq_mlp,
        **common,
    )


def _init_states(model_cfg) -> tuple[np.ndarray, np.ndarray]:
    """The model's fixed initial states; ``init_states`` reads nothing but ``cfg``, so no model is built."""
    z_h, z_l = RecursiveReasoner.init_states(types.SimpleNamespace(cfg=model_cfg))
    return np.asarray(z_h, np.float32), np.asarray(z_l, np.float32)


def _stacks(model_cfg, family: str) -> list[tuple[str, str, int]]:
    if family == "hrm":
        return [("H_level", "h_blocks", model_cfg.num_h_layers), ("L_level", "l_blocks", model_cfg.num_l_layers)]
    return [("L_level", "blocks", model_cfg.num_layers)]


def _ours_from_theirs(model_cfg, family: str, t: dict) -> dict[str, np.ndarray]:
    f32 = lambda name: np.asarray(t[name], np.float32)
    d, n, h = model_cfg.d_model, model_cfg.num_heads, model_cfg.head_dim
    used = {"H_init", "L_init"}

    def take(name):
        if name not in t:
            raise ExportError(f"checkpoint has no tensor {name!r} (have {sorted(t)[:12]} ...)")
        used.add(name)
        return f32(name)

    out = {
        "embed_VD": take("embed_tokens.embedding_weight"),
        "lm_head_DV": take("lm_head.weight").T,
        "q_head_D2": take("q_head.weight").T,
        "q_bias_2": take("q_head.bias"),
    }
    if model_cfg.puzzle_emb_dim > 0:
        out["puzzle_emb"] = take("puzzle_emb.weights")
    if model_cfg.pos_encoding == "learned":
        out["pos_LD"] = take("embed_pos.embedding_weight")
    for theirs, ours, count in _stacks(model_cfg, family):
        for i in range(count):
            a, b = f"{theirs}.layers.{i}.", f"{ours}.{i}."
            if family == "trm" and model_cfg.mixer == "mlp":
                gu = take(a + "mlp_t.gate_up_proj.weight")
                f = gu.shape[0] // 2
                out[b + "seq_gate_LF"], out[b + "seq_up_LF"] = gu[:f].T, gu[f:].T
                out[b + "seq_down_FL"] = take(a + "mlp_t.down_proj.weight").T
            else:
                qkv = take(a + "self_attn.qkv_proj.weight")  # [3 N H, D]
                if qkv.shape != (3 * n * h, d):
                    raise ExportError(f"{a}self_attn.qkv_proj.weight has shape {qkv.shape}, expected {(3 * n * h, d)}")
                q, k, v = np.split(qkv, 3, axis=0)
                out[b + "attn.q_DNH"] = q.T.reshape(d, n, h)
                out[b + "attn.k_DKH"] = k.T.reshape(d, n, h)
                out[b + "attn.v_DKH"] = v.T.reshape(d, n, h)
                out[b + "attn.o_NHD"] = take(a + "self_attn.o_proj.weight").T.reshape(n, h, d)
            gu = take(a + "mlp.gate_up_proj.weight")
            f = gu.shape[0] // 2
            out[b + "mlp.gate_DF"], out[b + "mlp.up_DF"] = gu[:f].T, gu[f:].T
            out[b + "mlp.down_FD"] = take(a + "mlp.down_proj.weight").T
    extra = sorted(set(t) - used)
    if extra:
        raise ExportError(f"checkpoint tensors with no place in the {family.upper()} model: {extra[:8]}")
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


# ---------------------------------------------------------------------------------------------
# Writing.


def _expansion(d: int, mlp_dim: int, what: str) -> float:
    for e in (4.0, mlp_dim * 3 / (2 * d)):
        if swiglu_hidden(d, e) == mlp_dim:
            return int(e) if float(e).is_integer() else e
    raise ExportError(f"{what}={mlp_dim} is not round(expansion * {d} * 2/3) rounded up to 256 for any expansion")


def official_arch(model_cfg) -> dict:
    """The all_config.yaml ``arch`` section of ``model_cfg`` (model hyper-parameters only)."""
    family = model_cfg.name
    if model_cfg.head_dim * model_cfg.num_heads != model_cfg.d_model:
        raise ExportError(f"the official code needs head_dim * num_heads == d_model, got {model_cfg.head_dim} * "
                          f"{model_cfg.num_heads} != {model_cfg.d_model}")  # fmt: skip
    expansion = _expansion(model_cfg.d_model, model_cfg.mlp_dim, "mlp_dim")
    loss = {v: k for k, v in LOSS_TYPES.items()}[model_cfg.loss_type]
    arch = {
        "name": ARCH_NAMES[family],
        "loss": {"name": "losses@ACTLossHead", "loss_type": loss},
        "halt_exploration_prob": model_cfg.halt_exploration_prob,
        "halt_max_steps": model_cfg.halt_max_steps,
        "hidden_size": model_cfg.d_model,
        "num_heads": model_cfg.num_heads,
        "expansion": expansion,
        "puzzle_emb_ndim": model_cfg.puzzle_emb_dim,
        "pos_encodings": model_cfg.pos_encoding,
        "rope_theta": model_cfg.rope_theta,
        "rms_norm_eps": model_cfg.norm_eps,
        "forward_dtype": model_cfg.dtype,
    }
    if family == "hrm":
        arch.update(
            H_cycles=model_cfg.h_cycles,
            L_cycles=model_cfg.l_cycles,
            H_layers=model_cfg.num_h_layers,
            L_layers=model_cfg.num_l_layers,
        )
    else:
        mlp_t = model_cfg.mixer == "mlp"
        if mlp_t and _expansion(model_cfg.total_len, model_cfg.resolved_seq_mlp_dim, "seq_mlp_dim") != expansion:
            raise ExportError("the official mlp_t uses one expansion for both SwiGLUs; seq_mlp_dim disagrees")
        arch.update(
            H_cycles=model_cfg.recursions,
            L_cycles=model_cfg.latent_steps,
            H_layers=0,
            L_layers=model_cfg.num_layers,
            mlp_t=mlp_t,
            puzzle_emb_len=model_cfg.puzzle_emb_len,
            no_ACT_continue=True,
        )
        if mlp_t and model_cfg.pos_encoding == "rope":
            arch["pos_encodings"] = "none"  # the mixer ignores positions; upstream then builds no RoPE table
    return arch


def theirs_from_ours(model_cfg, params: dict) -> dict[str, np.ndarray]:
    """The ``inner.`` state_dict tensors (without prefix) of our params, in upstream's key order."""
    family = model_cfg.name
    flat = {k: np.asarray(v, np.float32) for k, v in flatten_params(params).items()}
    d, n, h = model_cfg.d_model, model_cfg.num_heads, model_cfg.head_dim
    fwd = np.dtype(ml_dtypes.bfloat16) if model_cfg.dtype == "bfloat16" else np.dtype(np.float32)
    z_h, z_l = (z.astype(fwd) for z in _init_states(model_cfg))
    out = {"H_init": z_h, "L_init": z_l}
    out["embed_tokens.embedding_weight"] = flat["embed_VD"]
    out["lm_head.weight"] = flat["lm_head_DV"].T
    out["q_head.weight"] = flat["q_head_D2"].T
    out["q_head.bias"] = flat["q_bias_2"]
    if model_cfg.puzzle_emb_dim > 0:
        out["puzzle_emb.weights"] = flat["puzzle_emb"]
    if model_cfg.pos_encoding == "learned":
        out["embed_pos.embedding_weight"] = flat["pos_LD"]
    for theirs, ours, count in _stacks(model_cfg, family):
        for i in range(count):
            a, b = f"{theirs}.layers.{i}.", f"{ours}.{i}."
            if family == "trm" and model_cfg.mixer == "mlp":
                out[a + "mlp_t.gate_up_proj.weight"] = np.concatenate(
                    [flat[b + "seq_gate_LF"].T, flat[b + "seq_up_LF"].T]
                )
                out[a + "mlp_t.down_proj.weight"] = flat[b + "seq_down_FL"].T
            else:
                qkv = [flat[b + f"attn.{w}"].reshape(d, n * h).T for w in ("q_DNH", "k_DKH", "v_DKH")]
                out[a + "self_attn.qkv_proj.weight"] = np.concatenate(qkv)
                out[a + "self_attn.o_proj.weight"] = flat[b + "attn.o_NHD"].reshape(n * h, d).T
            out[a + "mlp.gate_up_proj.weight"] = np.concatenate([flat[b + "mlp.gate_DF"].T, flat[b + "mlp.up_DF"].T])
            out[a + "mlp.down_proj.weight"] = flat[b + "mlp.down_FD"].T
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def export_official(
    out_dir: str | Path,
    model_cfg,
    params: dict,
    *,
    step: int | None = None,
    source: str | None = None,
    weights: str = "params",
    compiled_prefix: bool = True,
    use_torch: bool | None = None,
    train_config: dict | None = None,
) -> Path:
    """Writes ``out_dir/step_<step>`` (torch.save, or ``.safetensors`` without torch) with keys
    ``_orig_mod.model.inner.*`` (``compiled_prefix=False``: ``model.inner.*``, an uncompiled
    ACTLossHead), ``all_config.yaml`` (arch + the PretrainConfig fields, ``train_config`` over the
    published defaults, ``ema`` when the weights are the EMA; a ``looped_jax`` section with the
    data-set sizes, which the official pydantic config ignores) and ``manifest.json``."""
    from looped_jax.export.params import manifest, write_manifest

    if model_cfg.name not in ARCH_NAMES:
        raise ExportError(f"the hrm / trm formats take HRM or TRM models, not {model_cfg.name!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prefix = PREFIX if compiled_prefix else PREFIX.removeprefix("_orig_mod.")
    tensors = {prefix + k: v for k, v in theirs_from_ours(model_cfg, params).items()}
    step = 0 if step is None else int(step)
    written = write_state_dict(out / f"step_{step}", tensors, use_torch=use_torch)
    data_key = "data_paths" if model_cfg.name == "trm" else "data_path"
    cfg = {
        "arch": official_arch(model_cfg),
        data_key: [] if data_key == "data_paths" else "",
        **PRETRAIN_DEFAULTS,
        "checkpoint_path": str(out),
        "ema": weights == "ema_params",
        **(train_config or {}),
        "looped_jax": {
            "family": model_cfg.name,
            "seq_len": model_cfg.seq_len,
            "vocab_size": model_cfg.vocab_size,
            "num_puzzle_identifiers": model_cfg.num_puzzle_ids,
            "init_state_seed": model_cfg.init_state_seed,
            "init_states_from_seed": not model_cfg.init_states,
            "source_step": step,
            "source_checkpoint": source,
        },
    }
    text = _yaml().safe_dump(cfg, sort_keys=False)
    tmp = out / (CONFIG_FILE + ".tmp")
    tmp.write_text(text)
    tmp.replace(out / CONFIG_FILE)
    extra = {"checkpoint_file": written.name, "dataset": {"seq_len": model_cfg.seq_len}}
    fmt = f"{model_cfg.name}_official"
    write_manifest(out, manifest(model_cfg, tensors, fmt=fmt, step=step, source=source, weights=weights, extra=extra))
    return out


__all__ = ["ImportedReasoner", "export_official", "import_official", "official_arch", "theirs_from_ours"]
