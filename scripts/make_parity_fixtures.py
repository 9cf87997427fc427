"""Makes the parity fixtures under tests/fixtures/ from the official modeling code (run once,
outside CI, in a separate environment with torch + transformers from the package registry):

    python scripts/make_parity_fixtures.py huginn --code_dir /path/to/dir_with_raven_package \
        --out tests/fixtures/huginn_raven

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("which", choices=["huginn"])
    ap.add_argument("--code_dir", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    Path(a.out).mkdir(parents=True, exist_ok=True)
    {"huginn": huginn}[a.which](a.code_dir, a.out)


if __name__ == "__main__":
    main()
