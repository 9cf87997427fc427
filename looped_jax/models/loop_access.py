"""Each looped family's loop as a `looped_jax.analysis.LoopSpec` (step + readout + start).

The analysis toolkit works on pure ``step(params, carry, inputs) -> carry`` functions; this
module is the one place that knows how each family's loop looks:

* ``recurrent_depth``: one core iteration s <- R(A([s; e])), readout coda + head;
* ``looped`` (shared weights): one pass of the loop body, readout final norm + head;
* ``hrm`` / ``trm``: one ACT segment (HRM: N x T low/high updates; TRM: T deep recursions of
  n latent steps + an answer update), rebuilt without the segment's stop_gradients so JVPs see
  the real Jacobian; readout the token head of z_H / y; the puzzle prefix is dropped from the
  analysed latent;
* ``gram``: one transition with the prior noise at its mean, h <- u + mu(u) (the stochastic
  transition's deterministic skeleton); readout the output head of h.

A family whose model does not loop (the unshared baseline, a one-segment HRM) is refused.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from looped_jax.analysis.loop import LoopSpec
from looped_jax.nn import Block
from looped_jax.nn.attention import attention_mask
from looped_jax.nn.linear import dense


class NotLoopingError(ValueError):
    """The model has no loop to analyse."""


def probe_block(block: Block, x_BTD, positions_BT, segment_ids_BT):
    """``Block.__call__`` (no cache) piece by piece -> (out, MLP hidden [B,T,F], attention [B,N,T,S])."""
    maybe = lambda norm, x: x if norm is None else norm(x)
    attn = block.attn
    q_BTNH, k_BTKH, v_BTKH = attn.project(maybe(block.norm_attn_in, x_BTD), positions_BT)
    seg = jnp.ones(positions_BT.shape, jnp.int32) if segment_ids_BT is None else segment_ids_BT
    mask_B1TS = attention_mask(positions_BT, positions_BT, seg, seg, kind=attn.mask_kind, window=attn.window)
    b, t, n, h = q_BTNH.shape
    kv = k_BTKH.shape[2]
    q_BTKGH = q_BTNH.reshape(b, t, kv, n // kv, h)
    logits = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BTKH, preferred_element_type=jnp.float32) / jnp.sqrt(h)
    logits = jnp.where(mask_B1TS[:, :, None], logits, jnp.finfo(jnp.float32).min)
    probs_BKGTS = jax.nn.softmax(logits, axis=-1)
    o_BTNH = jnp.einsum("bkgts,bskh->btkgh", probs_BKGTS.astype(v_BTKH.dtype), v_BTKH).reshape(b, t, n, h)
    x_BTD = maybe(block.norm_attn_out, x_BTD + attn.output(o_BTNH).astype(x_BTD.dtype))
    mlp = block.mlp
    xm = maybe(block.norm_mlp_in, x_BTD).astype(mlp.dtype)
    hid_BTF = jax.nn.silu(dense(xm, mlp.gate_DF[...].astype(mlp.dtype))) * dense(xm, mlp.up_DF[...].astype(mlp.dtype))
    x_BTD = maybe(block.norm_mlp_out, x_BTD + dense(hid_BTF, mlp.down_FD[...].astype(mlp.dtype)).astype(x_BTD.dtype))
    return x_BTD, hid_BTF, probs_BKGTS.reshape(b, n, t, t)


def _probe_stack(blocks, x_BTD, positions_BT, segment_ids_BT, acc: dict):
    for block in blocks:
        x_BTD, hid, probs = probe_block(block, x_BTD, positions_BT, segment_ids_BT)
        acc.setdefault("resid", []).append(x_BTD)
        acc.setdefault("mlp", []).append(hid)
        acc.setdefault("attn", []).append(probs)
    return x_BTD


def _stacked(acc: dict) -> dict:
    return {
        "resid_LBTD": jnp.stack(acc["resid"]),
        "mlp_LBTF": jnp.stack(acc["mlp"]),
        "attn_LBNTS": jnp.stack(acc["attn"]),
    }


def _positions(batch, inputs_BT):
    pos = batch.get("positions")
    if pos is None:
        pos = jnp.broadcast_to(jnp.arange(inputs_BT.shape[1], dtype=jnp.int32), inputs_BT.shape)
    return jnp.asarray(pos, jnp.int32), batch.get("segment_ids")


def _mask(batch, shape):
    w = batch.get("weights")
    return None if w is None else jnp.asarray(w).reshape(shape) > 0


def _recurrent_depth(model, batch, rng):
    inputs_BT = jnp.asarray(batch["inputs"], jnp.int32)
    pos, seg = _positions(batch, inputs_BT)
    e_BTD, pos = model._prepare(inputs_BT, pos, seg)
    s0 = model.initial_state(e_BTD, rng)
    graphdef, params = nnx.split(model)

    def step(p, s, inputs):
        e, positions, segs = inputs
        return nnx.merge(graphdef, p).core(s, e, positions, segs)[0]

    def readout(p, s):
        return nnx.merge(graphdef, p)._logits(s, pos, seg)

    def probe(p, s, inputs):
        e, positions, segs = inputs
        core = nnx.merge(graphdef, p).core
        x = core.inject(s, e)
        acc: dict = {}
        x = _probe_stack(core.blocks, x, positions, segs, acc)
        return x, _stacked(acc)

    return LoopSpec(
        step, params, s0, (e_BTD, pos, seg), readout, None, probe, _mask(batch, inputs_BT.shape), "recurrent_depth"
    )


def _looped(model, batch, rng):
    cfg = model.cfg
    if not cfg.share_weights:
        raise NotLoopingError("model.share_weights=False: the layers are unshared, there is no loop to iterate")
    inputs_BT = jnp.asarray(batch["inputs"], jnp.int32)
    pos, seg = _positions(batch, inputs_BT)
    e_BTD = model.embed_tokens(inputs_BT)
    graphdef, params = nnx.split(model)

    def step(p, x, inputs):
        e, positions, segs = inputs
        return nnx.merge(graphdef, p).body(x, e, positions, segs)[0]

    def readout(p, x):
        return nnx.merge(graphdef, p).head(x)

    probe = None
    if cfg.block_repeat == 1:

        def probe(p, x, inputs):
            e, positions, segs = inputs
            body = nnx.merge(graphdef, p).body
            if body.input_injection:
                x = x + e
            acc: dict = {}
            x = _probe_stack(body.blocks, x, positions, segs, acc)
            return x, _stacked(acc)

    mask = _mask(batch, inputs_BT.shape)
    return LoopSpec(step, params, model.initial_state(e_BTD), (e_BTD, pos, seg), readout, None, probe, mask, "looped")


def _reasoner_data(model, batch):
    inputs_BT = jnp.asarray(batch["inputs"], jnp.int32)
    b = inputs_BT.shape[0]
    pids = batch.get("puzzle_ids")
    data = {"inputs": inputs_BT, "puzzle_ids": jnp.zeros((b,), jnp.int32) if pids is None else jnp.asarray(pids)}
    return data, model.initial_states(b)


def _hrm(model, batch, rng):
    cfg = model.cfg
    if cfg.h_cycles * cfg.l_cycles == 1 and cfg.halt_max_steps == 1:
        raise NotLoopingError("HRM with h_cycles = l_cycles = halt_max_steps = 1 is a plain transformer: no loop")
    data, z0 = _reasoner_data(model, batch)
    graphdef, params = nnx.split(model)
    p_len = model.puzzle_emb_len

    def segment(p, z, data):
        m = nnx.merge(graphdef, p)
        z_H, z_L = z
        x = m.embed_inputs(data)
        positions = m.positions(x.shape[0])
        for i in range(cfg.h_cycles * cfg.l_cycles):
            z_L = m.f_low(z_L, z_H, x, positions)
            if (i + 1) % cfg.l_cycles == 0:
                z_H = m.f_high(z_H, z_L, positions)
        return z_H, z_L

    def readout(p, z):
        return nnx.merge(graphdef, p).heads(z[0])[0]

    def state_fn(z):
        return jnp.concatenate([z[0], z[1]], axis=-1)[:, p_len:].astype(jnp.float32)

    mask = _mask(batch, data["inputs"].shape)
    return LoopSpec(segment, params, z0, data, readout, state_fn, None, mask, "hrm")


def _trm(model, batch, rng):
    cfg = model.cfg
    data, z0 = _reasoner_data(model, batch)
    graphdef, params = nnx.split(model)
    p_len = cfg.puzzle_emb_len

    def segment(p, yz, data):
        m = nnx.merge(graphdef, p)
        y, z = yz
        x = m.embed_inputs(data)
        positions = m.positions(x.shape[0])
        for _ in range(cfg.recursions):
            for _ in range(cfg.latent_steps):
                z = m.net(z, y + x, positions)
            y = m.net(y, z, positions)
        return y, z

    def readout(p, yz):
        return nnx.merge(graphdef, p).heads(yz[0])[0]

    def state_fn(yz):
        return jnp.concatenate([yz[0], yz[1]], axis=-1)[:, p_len:].astype(jnp.float32)

    mask = _mask(batch, data["inputs"].shape)
    return LoopSpec(segment, params, z0, data, readout, state_fn, None, mask, "trm")


def _gram(model, batch, rng):
    inputs_BT = jnp.asarray(batch["inputs"], jnp.int32)
    model._check_inputs(inputs_BT)
    pos, seg = _positions(batch, inputs_BT)
    x_BTD = model.embed_inputs(inputs_BT)
    graphdef, params = nnx.split(model)

    def step(p, state, inputs):
        m = nnx.merge(graphdef, p)
        x, positions, segs = inputs
        u, l = m.deterministic_part(state[0], state[1], x, positions, segs)
        mu, _ = m.prior(u)
        return u + mu, l

    def readout(p, state):
        return nnx.merge(graphdef, p).logits(state[0])

    mask = _mask(batch, inputs_BT.shape)
    z0 = model.initial_state(inputs_BT.shape[0])
    return LoopSpec(step, params, z0, (x_BTD, pos, seg), readout, None, None, mask, "gram")


ACCESSORS = {"recurrent_depth": _recurrent_depth, "looped": _looped, "hrm": _hrm, "trm": _trm, "gram": _gram}


def loop_spec(model: nnx.Module, batch: dict, *, rng: jax.Array | None = None) -> LoopSpec:
    """The loop of ``model`` on ``batch`` (token ids in ``batch["inputs"]``, optional positions,
    segment_ids, weights -> token mask, puzzle_ids). ``rng`` seeds a random initial state where the
    family has one (recurrent depth); None gives its deterministic start."""
    name = getattr(getattr(model, "cfg", None), "name", None)
    if name not in ACCESSORS:
        raise ValueError(f"no loop accessor for model family {name!r}; the analysis supports {sorted(ACCESSORS)}")
    return ACCESSORS[name](model, batch, rng)
