"""Hierarchical Reasoning Model (Wang et al. 2025, "Hierarchical Reasoning Model").

Two latent states z_H, z_L of shape [B, P + T, D] (P puzzle-embedding prefix positions). One
segment (one forward) runs N high-level cycles of T low-level steps (defaults N = T = 2):

    z_L <- f_L(z_L + z_H + x)          T times per cycle
    z_H <- f_H(z_H + z_L)              once per cycle
    y_hat = head(z_H)[:, P:],   (q_halt, q_continue) = Linear(D, 2)(z_H[:, 0])

One-step gradient (Sec. 2, Eq. 4 and the 1-step approximation of the implicit-function gradient):
a segment is the loop engine's ``unroll`` over the N * T low-level steps k (step k runs f_L and,
when (k + 1) % T == 0, f_H) with ``grad_steps=1``, so every call except the last f_L and the last
f_H runs without gradient; the carry is detached between segments. f_L and f_H are
stacks of post-norm blocks (h = rms(h + sublayer(h)), RMSNorm without scale, eps 1e-5, f32),
SwiGLU, no biases, RoPE or learned positions, non-causal attention, truncated LeCun-normal
init; tokens are embedded with std 1/sqrt(D) and scaled by sqrt(D). Initial states are fixed
truncated-normal vectors (untrained; drawn from ``init_state_seed``, not parameters; or given
exactly by ``init_states``, as an imported official checkpoint's H_init / L_init buffers). Halting
and deep supervision live in ``looped_jax.models.act``. ``RecursiveReasoner`` holds the
embedding / heads / ACT plumbing that TRM (``models/trm.py``) shares.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from looped_jax.config import check_model_field as _check
from looped_jax.models import act
from looped_jax.models.protocol import LossOutput, token_eval_sums
from looped_jax.nn import Block, BlockConfig, apply_stack, lecun_truncated, param, resolve_dtype
from looped_jax.recurrence import is_static_int, unroll

POS_ENCODINGS = ("rope", "learned")
LEARNED_POS_SCALE = 1.0 / math.sqrt(2.0)  # x = (tok + pos) / sqrt(2) with learned positions


def swiglu_hidden(dim: int, expansion: float) -> int:
    """HRM/TRM's SwiGLU width: round(expansion * dim * 2 / 3) rounded up to a multiple of 256."""
    width = round(expansion * dim * 2 / 3)
    return -(-width // 256) * 256


def lecun_init_block(block: Block, rngs: nnx.Rngs) -> None:
    """Re-initialises a Block's matrices with truncated LeCun normal (std 1/sqrt(fan_in), +-2 std)."""
    key = rngs.params
    attn, mlp = block.attn, block.mlp
    d_model = attn.q_DNH.shape[0]
    for p in (attn.q_DNH, attn.k_DKH, attn.v_DKH, mlp.gate_DF, mlp.up_DF):
        p[...] = lecun_truncated(key(), p.shape, d_model)
    attn.o_NHD[...] = lecun_truncated(key(), attn.o_NHD.shape, attn.o_NHD.shape[0] * attn.o_NHD.shape[1])
    mlp.down_FD[...] = lecun_truncated(key(), mlp.down_FD.shape, mlp.down_FD.shape[0])


def post_norm_block_config(cfg, mask_kind: str = "bidirectional") -> BlockConfig:
    """HRM/TRM block: post-norm, RMSNorm without scale, non-causal, RoPE unless learned positions."""
    return BlockConfig(
        d_model=cfg.d_model,
        num_heads=cfg.num_heads,
        num_kv_heads=cfg.num_heads,
        head_dim=cfg.head_dim,
        mlp_dim=cfg.mlp_dim,
        norm_style="post",
        norm_eps=cfg.norm_eps,
        norm_scale=False,
        mask_kind=mask_kind,
        rope_theta=cfg.rope_theta if cfg.pos_encoding == "rope" else None,
        dtype=cfg.dtype,
    )


def validate_reasoner_fields(cfg) -> None:
    """Checks the fields HRM and TRM configs share."""
    for f in ("vocab_size", "seq_len", "d_model", "num_heads", "head_dim", "mlp_dim", "num_puzzle_ids"):
        _check(getattr(cfg, f) >= 1, f, ">= 1", getattr(cfg, f))
    _check(cfg.puzzle_emb_dim >= 0, "puzzle_emb_dim", ">= 0", cfg.puzzle_emb_dim)
    _check(cfg.head_dim % 2 == 0, "head_dim", "even (rotary embeddings)", cfg.head_dim)
    _check(cfg.pos_encoding in POS_ENCODINGS, "pos_encoding", f"one of {POS_ENCODINGS}", cfg.pos_encoding)
    _check(cfg.rope_theta > 0, "rope_theta", "> 0", cfg.rope_theta)
    _check(cfg.norm_eps > 0, "norm_eps", "> 0", cfg.norm_eps)
    _check(cfg.halt_max_steps >= 1, "halt_max_steps", ">= 1", cfg.halt_max_steps)
    _check(0 <= cfg.halt_exploration_prob <= 1, "halt_exploration_prob", "in [0, 1]", cfg.halt_exploration_prob)
    _check(cfg.loss_type in ("stablemax", "softmax"), "loss_type", "'stablemax' or 'softmax'", cfg.loss_type)
    _check(cfg.dtype in ("float32", "bfloat16"), "dtype", "'float32' or 'bfloat16'", cfg.dtype)
    if cfg.init_states:
        lens = [len(v) for v in cfg.init_states]
        _check(lens == [cfg.d_model] * 2, "init_states", f"() or two vectors of d_model={cfg.d_model} floats", lens)


@dataclasses.dataclass(frozen=True)
class HRMConfig:
    """HRM. Defaults: the published Sudoku-Extreme model (27,275,266 parameters without the
    puzzle embedding: vocab 11, 4 + 4 layers of width 512, SwiGLU width 1536)."""

    name: str = "hrm"
    vocab_size: int = 11
    seq_len: int = 81  # puzzle tokens T (without the prefix)
    num_puzzle_ids: int = 1
    puzzle_emb_dim: int = 512  # 0 = no puzzle embedding; prefix P = ceil(puzzle_emb_dim / d_model)
    d_model: int = 512
    num_heads: int = 8
    head_dim: int = 64
    mlp_dim: int = 1536  # swiglu_hidden(512, 4)
    num_h_layers: int = 4
    num_l_layers: int = 4
    h_cycles: int = 2  # N
    l_cycles: int = 2  # T
    pos_encoding: str = "rope"
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-5
    halt_max_steps: int = 16
    halt_exploration_prob: float = 0.1
    loss_type: str = "stablemax"
    init_state_seed: int = 0  # seed of the fixed initial states
    init_states: tuple[tuple[float, ...], ...] = ()  # exact (z_H, z_L) initial vectors; () = from the seed
    dtype: str = "float32"  # compute dtype (the paper trains in bfloat16); params and states float32

    def __post_init__(self):
        _check(self.name == "hrm", "name", "'hrm'", self.name)
        validate_reasoner_fields(self)
        for f in ("num_h_layers", "num_l_layers", "h_cycles", "l_cycles"):
            _check(getattr(self, f) >= 1, f, ">= 1", getattr(self, f))

    @property
    def puzzle_emb_len(self) -> int:
        return -(-self.puzzle_emb_dim // self.d_model)


class RecursiveReasoner(nnx.Module):
    """Embeddings, output and Q heads, fixed initial states and the ACT / deep-supervision API
    shared by HRM and TRM. Subclasses define ``segment(z, data) -> (z, logits, q_halt, q_cont)``."""

    use_continue: bool = True  # HRM learns q_continue; TRM halts on q_halt > 0 alone

    def _init_io(self, cfg, puzzle_emb_len: int, rngs: nnx.Rngs) -> None:
        self.cfg = cfg
        self.puzzle_emb_len = puzzle_emb_len
        self.total_len = puzzle_emb_len + cfg.seq_len
        self.dtype = resolve_dtype(cfg.dtype)
        d, key = cfg.d_model, rngs.params
        self.embed_VD = param(lecun_truncated(key(), (cfg.vocab_size, d), d), ("vocab", "embed"))
        self.puzzle_emb = (
            param(jnp.zeros((cfg.num_puzzle_ids, cfg.puzzle_emb_dim), jnp.float32), (None, None))
            if cfg.puzzle_emb_dim > 0
            else None
        )
        self.pos_LD = (
            param(lecun_truncated(key(), (self.total_len, d), d), (None, "embed"))
            if cfg.pos_encoding == "learned"
            else None
        )
        self.lm_head_DV = param(lecun_truncated(key(), (d, cfg.vocab_size), d), ("embed", "vocab"))
        self.q_head_D2 = param(jnp.zeros((d, 2), jnp.float32), ("embed", None))
        self.q_bias_2 = param(jnp.full((2,), -5.0, jnp.float32), (None,))

    # -- pieces ---------------------------------------------------------------------------------

    def init_states(self) -> tuple[jax.Array, jax.Array]:
        """Fixed (z_H, z_L) initial vectors [D]: ``cfg.init_states`` when given, else truncated
        normal (std 1, cut at +-2 std) drawn from ``cfg.init_state_seed``."""
        if self.cfg.init_states:
            z_h, z_l = (jnp.asarray(v, jnp.float32) for v in self.cfg.init_states)
            return z_h, z_l
        k_h, k_l = jax.random.split(jax.random.key(self.cfg.init_state_seed))
        d = self.cfg.d_model
        return lecun_truncated(k_h, (d,), 1), lecun_truncated(k_l, (d,), 1)

    def positions(self, batch_size: int) -> jax.Array:
        return jnp.broadcast_to(jnp.arange(self.total_len, dtype=jnp.int32), (batch_size, self.total_len))

    def embed_inputs(self, data: dict) -> jax.Array:
        """x [B, P + T, D] = sqrt(D) * [puzzle prefix; token embeddings] (+ learned positions)."""
        tokens_BT = data["inputs"]
        b, d, p = tokens_BT.shape[0], self.cfg.d_model, self.puzzle_emb_len
        x_BTD = jnp.take(self.embed_VD[...], tokens_BT, axis=0)
        if p > 0:
            if self.puzzle_emb is not None:
                pe_BE = jnp.take(self.puzzle_emb[...], data["puzzle_ids"], axis=0)
                pe_BE = jnp.pad(pe_BE, ((0, 0), (0, p * d - pe_BE.shape[-1])))
                prefix_BPD = pe_BE.reshape(b, p, d)
            else:
                prefix_BPD = jnp.zeros((b, p, d), x_BTD.dtype)
            x_BTD = jnp.concatenate([prefix_BPD, x_BTD], axis=1)
        if self.pos_LD is not None:
            x_BTD = LEARNED_POS_SCALE * (x_BTD + self.pos_LD[...])
        return (math.sqrt(d) * x_BTD).astype(self.dtype)

    def heads(self, z_H_BLD: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Token logits [B, T, V] (prefix dropped) and (q_halt, q_continue) [B] from position 0."""
        logits_BLV = jnp.einsum(
            "bld,dv->blv",
            z_H_BLD.astype(self.dtype),
            self.lm_head_DV[...].astype(self.dtype),
            preferred_element_type=jnp.float32,
        )
        q_B2 = z_H_BLD[:, 0].astype(jnp.float32) @ self.q_head_D2[...] + self.q_bias_2[...]
        return logits_BLV[:, self.puzzle_emb_len :], q_B2[:, 0], q_B2[:, 1]

    def segment(self, z, data: dict):  # pragma: no cover - abstract
        raise NotImplementedError

    # -- ACT / deep supervision API (trainer carry protocol) -------------------------------------

    def z_init(self) -> tuple[jax.Array, jax.Array]:
        z_h, z_l = self.init_states()
        return z_h, z_l

    def initial_states(self, batch_size: int) -> tuple[jax.Array, jax.Array]:
        shape = (batch_size, self.total_len, self.cfg.d_model)
        return tuple(jnp.broadcast_to(z, shape) for z in self.z_init())

    def initial_carry(self, batch_size: int) -> dict:
        """Per-row deep-supervision carry; every row starts halted (loads an example at step 1)."""
        return act.initial_act_carry(self.initial_states(batch_size), batch_size, self.cfg.seq_len)

    def loss(
        self, batch: dict, *, rng: jax.Array | None = None, train: bool = True, carry: dict | None = None
    ) -> LossOutput:
        """One deep-supervision segment for every row; the new ACT carry goes to the next step."""
        if carry is None:
            carry = self.initial_carry(batch["inputs"].shape[0])
        new_carry, outputs = act.act_step(
            self.segment,
            carry,
            batch,
            self.z_init(),
            rng=rng,
            train=train,
            max_steps=self.cfg.halt_max_steps,
            exploration_prob=self.cfg.halt_exploration_prob,
            use_continue=self.use_continue,
        )
        loss, metrics = act.act_loss(new_carry, outputs, loss_type=self.cfg.loss_type)
        return LossOutput(loss, metrics, new_carry)

    def evaluate(self, batch: dict, *, num_loops=None, rng: jax.Array | None = None) -> dict:
        """Summed token loss / accuracy of the answer after ``num_loops`` segments (default
        halt_max_steps), plus ``exact_sum`` (rows whose weighted tokens are all right) and
        ``num_rows`` (rows with any weight)."""
        del rng
        logits_BTV = self(batch["inputs"], num_loops=num_loops, puzzle_ids_B=batch.get("puzzle_ids"))
        sums = token_eval_sums(logits_BTV, batch)
        exact_B, valid_B = act.exact_match(logits_BTV, batch["targets"], batch["weights"])
        sums.update(exact_sum=exact_B.sum().astype(jnp.float32), num_rows=valid_B.sum().astype(jnp.float32))
        return sums

    def evaluate_steps(self, batch: dict, num_steps: int | None = None) -> dict:
        """Exact accuracy after every ACT step and the step the halting rule picks (act.evaluate_all_steps)."""
        steps = num_steps or self.cfg.halt_max_steps
        b = batch["inputs"].shape[0]
        return act.evaluate_all_steps(
            self.segment, self.initial_states(b), batch, max_steps=steps, use_continue=self.use_continue
        )

    def __call__(
        self,
        inputs_BT: jax.Array,
        *,
        positions_BT: jax.Array | None = None,
        segment_ids_BT: jax.Array | None = None,
        num_loops=None,
        rng: jax.Array | None = None,
        puzzle_ids_B: jax.Array | None = None,
    ) -> jax.Array:
        """Logits after ``num_loops`` ACT segments (default halt_max_steps), no early halting.

        ``num_loops`` is a Python int >= 1 or a traced int32 (values below 1 count as 1; one
        compile for every value). Only the last segment is differentiated (the segments detach
        their carry anyway). Positions and segment ids of the batch are not used: grids are
        fixed-length, positions are 0..P+T-1 and attention spans the whole grid, as in the
        public code.
        """
        del positions_BT, segment_ids_BT, rng
        b = inputs_BT.shape[0]
        data = {"inputs": inputs_BT.astype(jnp.int32)}
        data["puzzle_ids"] = jnp.zeros((b,), jnp.int32) if puzzle_ids_B is None else puzzle_ids_B
        steps = self.cfg.halt_max_steps if num_loops is None else num_loops
        if is_static_int(steps):
            _check(steps >= 1, "num_loops", ">= 1 (ACT segments)", steps)
        else:
            steps = jnp.maximum(jnp.asarray(steps, jnp.int32), 1)
        graphdef, params = nnx.split(self)

        def step(params, carry, data):
            z, _ = carry
            z, logits_BTV, _, _ = nnx.merge(graphdef, params).segment(z, data)
            return z, logits_BTV

        logits0_BTV = jnp.zeros((b, self.cfg.seq_len, self.cfg.vocab_size), jnp.float32)
        (_, logits_BTV), _ = unroll(
            step, params, (self.initial_states(b), logits0_BTV), data, num_steps=steps, grad_steps=1
        )
        return logits_BTV


class HRMModel(RecursiveReasoner):
    """HRM with one-step gradient; see the module docstring."""

    use_continue = True

    def __init__(self, cfg: HRMConfig, *, rngs: nnx.Rngs):
        self._init_io(cfg, cfg.puzzle_emb_len, rngs)
        bcfg = post_norm_block_config(cfg)

        def stack(n):
            blocks = []
            for _ in range(n):
                block = Block(bcfg, init_std=1.0, out_init_std=1.0, rngs=rngs)
                lecun_init_block(block, rngs)
                blocks.append(block)
            return nnx.List(blocks)

        self.h_blocks = stack(cfg.num_h_layers)
        self.l_blocks = stack(cfg.num_l_layers)

    def f_low(self, z_L: jax.Array, z_H: jax.Array, x: jax.Array, positions_BL: jax.Array) -> jax.Array:
        """z_L <- f_L(z_L + z_H + x)."""
        return apply_stack(self.l_blocks, z_L + z_H + x, positions_BL)[0]

    def f_high(self, z_H: jax.Array, z_L: jax.Array, positions_BL: jax.Array) -> jax.Array:
        """z_H <- f_H(z_H + z_L)."""
        return apply_stack(self.h_blocks, z_H + z_L, positions_BL)[0]

    def segment(self, z, data: dict):
        """One forward: returns ((z_H, z_L) detached, logits [B,T,V], q_halt [B], q_continue [B]).

        ``unroll`` over the N * T low-level steps with grad_steps=1: the first N * T - 1 steps see
        parameters, inputs and carry under stop_gradient; the last (f_L, then f_H) is differentiated.
        """
        z_H, z_L = (jax.lax.stop_gradient(s.astype(jnp.float32)) for s in z)
        x = self.embed_inputs(data)
        positions_BL = self.positions(x.shape[0])
        graphdef, params = nnx.split(self)
        l_cycles = self.cfg.l_cycles

        def high(params, z_H, z_L, positions_BL):
            return nnx.merge(graphdef, params).f_high(z_H, z_L, positions_BL)

        def keep(params, z_H, z_L, positions_BL):
            return z_H

        def low_step(params, zs, inputs, *, index):
            z_H, z_L = zs
            x, positions_BL = inputs
            z_L = nnx.merge(graphdef, params).f_low(z_L, z_H, x, positions_BL)
            z_H = jax.lax.cond((index + 1) % l_cycles == 0, high, keep, params, z_H, z_L, positions_BL)
            return z_H, z_L

        (z_H, z_L), _ = unroll(
            low_step,
            params,
            (z_H, z_L),
            (x, positions_BL),
            num_steps=self.cfg.h_cycles * l_cycles,
            grad_steps=1,
            with_index=True,
        )
        logits_BTV, q_halt_B, q_cont_B = self.heads(z_H)
        return jax.lax.stop_gradient((z_H, z_L)), logits_BTV, q_halt_B, q_cont_B
