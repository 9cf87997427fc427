"""Makes the parity fixtures under tests/fixtures/ from the official modeling code (run once,
outside CI, in a separate environment with torch + transformers from the package registry):

    python scripts/make_parity_fixtures.py huginn --code_dir /path/to/dir_with_raven_package \
        --out tests/fixtures/huginn_raven
    python scripts/make_parity_fixtures.py hrm --code_dir /path/to/sapientinc/HRM --out tests/fixtures/hrm
    python scripts/make_parity_fixtures.py trm --code_dir /path/to/TinyRecursiveModels --out tests/fixtures/trm
    python scripts/make_parity_fixtures.py llama --out tests/fixtures/llama

``--code_dir`` must contain a package ``raven/`` holding the official ``raven_modeling_minimal.py``
and ``raven_config_minimal.py`` (seal-rg/recurrent-pretraining, recpre/); they are imported
read-only and never copied into this repository. The fixture is a tiny random model saved
with the official ``save_pretrained`` (sharded safetensors + index + config.json), its input
ids, the official logits at num_steps 1, 4 and 16 (zero initial state, so deterministic) and
greedy tokens decoded with the official KV cache (HuginnDynamicCache).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

TINY_RAVEN = dict(
    n_embd=32,
    n_heads=4,
    n_layers=4,
    block_size=64,
    vocab_size=96,
    padding_multiple=1,
    intermediate_size=48,
    n_layers_in_prelude=1,
    n_layers_in_recurrent_block=2,
    n_layers_in_coda=1,
    mean_recurrence=4,
    mean_backprop_depth=2,
    qk_bias=True,
    rope_base=50_000.0,
    torch_dtype="float32",
)
STEPS = (1, 4, 16)
GREEDY_STEPS, GREEDY_NEW = 4, 6


def huginn(code_dir: str, out: str) -> None:
    import torch

    sys.path.insert(0, code_dir)
    from raven.raven_config_minimal import RavenConfig
    from raven.raven_modeling_minimal import HuginnDynamicCache, RavenForCausalLM

    torch.manual_seed(0)
    cfg = RavenConfig(**TINY_RAVEN)
    model = RavenForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norms / biases so every name-map entry is exercised
        for name, p in model.named_parameters():
            if "norm" in name or "ln_f" in name or "qk_bias" in name:
                p.add_(0.1 * torch.randn_like(p))
    out_dir = Path(out)
    hf_dir = out_dir / "checkpoint"
    model.save_pretrained(hf_dir, safe_serialization=True, max_shard_size="40KB")
    for copied in hf_dir.glob("*.py"):  # save_pretrained copies the custom code; it stays upstream
        copied.unlink()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (2, 11), generator=g)
    arrays = {"input_ids": ids.numpy().astype(np.int32)}
    with torch.no_grad():
        for n in STEPS:
            o = model(ids, num_steps=torch.tensor([n, 0]), input_states=torch.zeros(2, ids.shape[1], cfg.n_embd))
            arrays[f"logits_steps{n}"] = o.logits.float().numpy()
        # greedy decoding with the official KV cache (prompt = first row's first 7 tokens)
        tokens = ids[:1, :7]
        cache = HuginnDynamicCache()
        seen = 0
        for _ in range(GREEDY_NEW):
            new = tokens[:, seen:]
            pos = seen + torch.arange(new.shape[1])
            o = model(
                input_ids=new,
                num_steps=torch.tensor([GREEDY_STEPS, 0]),
                past_key_values=cache,
                position_ids=pos,
                input_states=torch.zeros(1, new.shape[1], cfg.n_embd),
                use_cache=True,
            )
            seen = tokens.shape[1]
            nxt = o.logits[:, -1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, nxt], 1)
        arrays["greedy_prompt"] = ids[:1, :7].numpy().astype(np.int32)
        arrays["greedy_tokens"] = tokens[:, 7:].numpy().astype(np.int32)
    np.savez_compressed(out_dir / "official_outputs.npz", **arrays)
    (out_dir / "fixture.json").write_text(
        json.dumps({"steps": STEPS, "greedy_steps": GREEDY_STEPS, "torch": torch.__version__}, indent=1)
    )
    print("wrote", out_dir, sorted(arrays))


# ---------------------------------------------------------------------------------------------
# HRM (sapientinc/HRM) and TRM (SamsungSAILMontreal/TinyRecursiveModels).

TINY_HRM = dict(  # arch section of all_config.yaml (hrm_v1.yaml shape, tiny sizes, float32)
    name="hrm.hrm_act_v1@HierarchicalReasoningModel_ACTV1",
    loss=dict(name="losses@ACTLossHead", loss_type="stablemax_cross_entropy"),
    halt_exploration_prob=0.1,
    halt_max_steps=4,
    H_cycles=2,
    L_cycles=2,
    H_layers=2,
    L_layers=2,
    hidden_size=16,
    num_heads=2,
    expansion=4,
    puzzle_emb_ndim=24,  # not a multiple of hidden_size: 2 prefix positions, the second zero-padded
    pos_encodings="rope",
    rope_theta=10000.0,
    forward_dtype="float32",
)
TINY_TRM = dict(  # trm.yaml shape, tiny sizes, float32
    name="recursive_reasoning.trm@TinyRecursiveReasoningModel_ACTV1",
    loss=dict(name="losses@ACTLossHead", loss_type="stablemax_cross_entropy"),
    halt_exploration_prob=0.1,
    halt_max_steps=4,
    H_cycles=2,
    L_cycles=3,
    H_layers=0,
    L_layers=2,
    hidden_size=16,
    num_heads=2,
    expansion=4,
    puzzle_emb_ndim=16,
    pos_encodings="rope",
    forward_dtype="float32",
    mlp_t=False,
    puzzle_emb_len=4,
    no_ACT_continue=True,
)
TINY_DATA = dict(vocab_size=10, seq_len=12, num_puzzle_identifiers=5)  # PuzzleDatasetMetadata fields
REASONER_BATCH = 3


def _sdpa_flash_attn() -> None:
    """Registers a stand-in ``flash_attn_interface`` module whose ``flash_attn_func`` (q, k, v of
    [B, S, H, D]) runs torch's scaled_dot_product_attention, so the official HRM code imports on CPU."""
    import types

    import torch

    def flash_attn_func(q, k, v, causal=False, **_):
        o = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal
        )
        return o.transpose(1, 2).contiguous()

    mod = types.ModuleType("flash_attn_interface")
    mod.flash_attn_func = flash_attn_func
    sys.modules["flash_attn_interface"] = mod


def _all_config(arch: dict, *, data_key: str, ema: bool | None) -> dict:
    """The fields of the official ``PretrainConfig.model_dump()`` (pretrain.py) for a tiny run."""
    cfg = {
        "arch": arch,
        data_key: "data/tiny-fixture" if data_key == "data_path" else ["data/tiny-fixture"],
        "global_batch_size": REASONER_BATCH,
        "epochs": 1,
        "lr": 1e-4,
        "lr_min_ratio": 1.0,
        "lr_warmup_steps": 1,
        "weight_decay": 0.1,
        "beta1": 0.9,
        "beta2": 0.95,
        "puzzle_emb_lr": 1e-2,
        "puzzle_emb_weight_decay": 0.1,
        "project_name": "fixture",
        "run_name": "tiny",
        "checkpoint_path": None,
        "seed": 0,
        "checkpoint_every_eval": True,
        "eval_interval": None,
        "eval_save_outputs": [],
    }
    if ema is not None:
        cfg.update(ema=ema, ema_rate=0.999)
    return cfg


BRANCH_SCALE = 0.25


def _randomize_zero_inits(inner, torch) -> None:
    """The official code zero-inits the puzzle table and the Q head; give them values so that every
    entry of the name map is exercised. The residual branches' output projections (o_proj,
    down_proj) are scaled by BRANCH_SCALE so that the random recursion contracts: at the default
    init these tiny models are chaotic, and float32 rounding alone (the official code in float32
    against itself in float64) grows past 1e-5 within 2-4 ACT steps (TRM mlp_t: 6e-3 at step 4),
    which would make a 1e-5 parity check meaningless. fixture.json records that drift."""
    with torch.no_grad():
        for name, p in inner.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.mul_(BRANCH_SCALE)
        if hasattr(inner, "puzzle_emb"):
            inner.puzzle_emb.weights.copy_(0.5 * torch.randn_like(inner.puzzle_emb.weights))
        inner.q_head.weight.copy_(0.3 * torch.randn_like(inner.q_head.weight))
        inner.q_head.bias.copy_(torch.randn_like(inner.q_head.bias))


def _f64_drift(model_cls, model_cfg: dict, act_model, arrays: dict, torch, steps: int) -> float:
    """Max |official float32 - official float64| logits over the steps: the rounding noise floor."""
    ref = model_cls({**model_cfg, "forward_dtype": "float64"})
    ref.inner.load_state_dict({k: v.double() for k, v in act_model.inner.state_dict().items()})
    ref.double().eval()
    hi = _act_outputs(ref, torch, steps)
    return max(float(np.abs(hi[f"logits_step{s}"] - arrays[f"logits_step{s}"]).max()) for s in range(1, steps + 1))


def _act_outputs(act_model, torch, steps: int) -> dict:
    """Inputs and the official ACT wrapper's logits / Q-values after every step 1..steps (eval mode:
    no early halting), from the official initial carry (every row halted -> reset to H_init / L_init)."""
    g = torch.Generator().manual_seed(1)
    b, t = REASONER_BATCH, TINY_DATA["seq_len"]
    batch = {
        "inputs": torch.randint(0, TINY_DATA["vocab_size"], (b, t), generator=g, dtype=torch.int32),
        "labels": torch.randint(0, TINY_DATA["vocab_size"], (b, t), generator=g, dtype=torch.int32),
        "puzzle_identifiers": torch.tensor([0, 3, 4], dtype=torch.int32),
    }
    arrays = {k: v.numpy().astype(np.int32) for k, v in batch.items()}
    with torch.no_grad():
        carry = act_model.initial_carry(batch)
        for step in range(1, steps + 1):
            carry, out = act_model(carry=carry, batch=batch)
            arrays[f"logits_step{step}"] = out["logits"].numpy()
            arrays[f"q_halt_step{step}"] = out["q_halt_logits"].numpy()
            arrays[f"q_continue_step{step}"] = out["q_continue_logits"].numpy()
    return arrays


def _save_reasoner(out_dir: Path, wrapped, all_config: dict, arrays: dict, torch, step: int, extra: dict) -> None:
    import yaml

    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(wrapped.state_dict(), out_dir / f"step_{step}")  # keys "_orig_mod.model.inner...."
    with open(out_dir / "all_config.yaml", "w") as f:
        yaml.dump(all_config, f)
    (out_dir / "dataset.json").write_text(json.dumps({**TINY_DATA, "pad_id": 0, "ignore_label_id": 0}, indent=1))
    np.savez_compressed(out_dir / "official_outputs.npz", **arrays)
    info = {"checkpoint": f"step_{step}", "torch": torch.__version__, "batch": REASONER_BATCH, **extra}
    (out_dir / "fixture.json").write_text(json.dumps(info, indent=1))
    print("wrote", out_dir, sorted(arrays))


def hrm(code_dir: str, out: str) -> None:
    """Tiny random HRM built by the official code, wrapped as pretrain.py does (ACTLossHead +
    torch.compile, hence the ``_orig_mod.`` prefixes), its state_dict and all_config.yaml."""
    import torch

    _sdpa_flash_attn()
    sys.path.insert(0, code_dir)
    from models.hrm.hrm_act_v1 import HierarchicalReasoningModel_ACTV1
    from models.losses import ACTLossHead

    torch.manual_seed(0)
    arch = dict(TINY_HRM)
    model_cfg = {k: v for k, v in arch.items() if k not in ("name", "loss")}
    model_cfg.update(batch_size=REASONER_BATCH, causal=False, **TINY_DATA)
    act_model = HierarchicalReasoningModel_ACTV1(model_cfg)
    _randomize_zero_inits(act_model.inner, torch)
    wrapped = torch.compile(ACTLossHead(act_model, loss_type=arch["loss"]["loss_type"]), dynamic=False)
    act_model.eval()
    arrays = _act_outputs(act_model, torch, arch["halt_max_steps"])
    drift = _f64_drift(HierarchicalReasoningModel_ACTV1, model_cfg, act_model, arrays, torch, arch["halt_max_steps"])
    cfg = _all_config(arch, data_key="data_path", ema=None)
    _save_reasoner(Path(out), wrapped, cfg, arrays, torch, 100, {"f32_vs_f64_logits": drift})


def trm(code_dir: str, out: str) -> None:
    """Two tiny random TRMs from the official code: ``attention/`` (saved as pretrain.py saves with
    ``ema: True``: the EMAHelper's copy after one perturbation of the weights) and ``mlp_t/`` (the
    MLP-mixer variant with ``pos_encodings: none``)."""
    import torch

    sys.path.insert(0, code_dir)
    from models.ema import EMAHelper
    from models.losses import ACTLossHead
    from models.recursive_reasoning.trm import TinyRecursiveReasoningModel_ACTV1

    for sub, over, ema in (("attention", {}, True), ("mlp_t", {"mlp_t": True, "pos_encodings": "none"}, False)):
        torch.manual_seed(0 if sub == "attention" else 1)
        arch = {**TINY_TRM, **over}
        model_cfg = {k: v for k, v in arch.items() if k not in ("name", "loss")}
        model_cfg.update(batch_size=REASONER_BATCH, causal=False, **TINY_DATA)
        act_model = TinyRecursiveReasoningModel_ACTV1(model_cfg)
        _randomize_zero_inits(act_model.inner, torch)
        wrapped = torch.compile(ACTLossHead(act_model, loss_type=arch["loss"]["loss_type"]), dynamic=False)
        if ema:  # register, "train" (perturb), update: the saved weights are the EMA copy
            helper = EMAHelper(mu=0.5)
            helper.register(wrapped)
            with torch.no_grad():
                for p in wrapped.parameters():
                    p.add_(0.05 * torch.randn_like(p))
            helper.update(wrapped)
            wrapped = helper.ema_copy(wrapped)
            act_model = wrapped._orig_mod.model
        act_model.eval()
        steps = arch["halt_max_steps"]
        arrays = _act_outputs(act_model, torch, steps)
        drift = _f64_drift(TinyRecursiveReasoningModel_ACTV1, model_cfg, act_model, arrays, torch, steps)
        cfg = _all_config(arch, data_key="data_paths", ema=ema)
        _save_reasoner(Path(out) / sub, wrapped, cfg, arrays, torch, 200, {"ema": ema, "f32_vs_f64_logits": drift})


# ---------------------------------------------------------------------------------------------
# Llama (Hugging Face transformers) for scripts/retrofit.py.

TINY_LLAMA = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    attention_bias=False,
    mlp_bias=False,
    initializer_range=0.25,  # far above the default 0.02, so attention is far from uniform and every weight matters
)


def llama(code_dir: str, out: str) -> None:
    """A tiny random ``LlamaForCausalLM`` (transformers from the package registry; ``code_dir``
    unused) saved with ``save_pretrained`` (safetensors), its input ids and logits."""
    del code_dir
    import torch
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**TINY_LLAMA)
    model = LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():  # non-trivial norm scales so the norm name map is exercised
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    out_dir = Path(out)
    model.save_pretrained(out_dir / "checkpoint", safe_serialization=True)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (2, 11), generator=g)
    with torch.no_grad():
        logits = model(ids).logits.float().numpy()
    np.savez_compressed(out_dir / "official_outputs.npz", input_ids=ids.numpy().astype(np.int32), logits=logits)
    info = {"torch": torch.__version__, "transformers": transformers.__version__}
    (out_dir / "fixture.json").write_text(json.dumps(info, indent=1))
    print("wrote", out_dir)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("which", choices=["huginn", "hrm", "trm", "llama"])
    ap.add_argument("--code_dir", default="")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    Path(a.out).mkdir(parents=True, exist_ok=True)
    {"huginn": huginn, "hrm": hrm, "trm": trm, "llama": llama}[a.which](a.code_dir, a.out)


if __name__ == "__main__":
    main()
