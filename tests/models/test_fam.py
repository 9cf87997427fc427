"""TransformerFAM: semantics vs a dense-mask reference, reduction to the plain model, streaming == parallel,
BPTT through the FAM, random state passing."""

import dataclasses
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from looped_jax.models.fam import FamConfig, FamModel, fam_config_from_looped, load_looped_params
from looped_jax.models.looped import LoopedConfig, LoopedModel

TINY = FamConfig(
    vocab_size=29,
    d_model=32,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    mlp_dim=48,
    num_layers=2,
    block_size=4,
    memory_segments=1,
    fam_length=2,
)


def make(**kw) -> FamModel:
    return FamModel(dataclasses.replace(TINY, **kw), rngs=nnx.Rngs(0))


def tokens(batch: int, length: int, seed: int = 0) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), (batch, length), 0, TINY.vocab_size)


def run(model, fn, *args):
    """fn(model, *args) under jax.jit (the model passed as split state)."""
    graphdef, state = nnx.split(model)
    return jax.jit(lambda s, *a: fn(nnx.merge(graphdef, s), *a))(state, *args)


def jit_forward(model: FamModel, x, **kw):
    return run(model, lambda m: m.forward(x, **kw))


def test_config_validation():
    with pytest.raises(ValueError, match="model.fam_length"):
        dataclasses.replace(TINY, fam_length=5)
    with pytest.raises(ValueError, match="model.memory_segments"):
        dataclasses.replace(TINY, memory_segments=-1)
    with pytest.raises(ValueError, match="model.state_passing_prob"):
        dataclasses.replace(TINY, state_passing_prob=1.5)
    assert TINY.window == 8


def _softmax_attend(q_BTHK, k_BLGK, v_BLGK, mask_TL):
    """Plain dense-mask GQA attention (independent of the model's and the kernel's code)."""
    R = q_BTHK.shape[2] // k_BLGK.shape[2]
    k_BLHK, v_BLHK = jnp.repeat(k_BLGK, R, axis=2), jnp.repeat(v_BLGK, R, axis=2)
    s_BHTL = jnp.einsum("bthk,blhk->bhtl", q_BTHK, k_BLHK) / np.sqrt(q_BTHK.shape[-1])
    p_BHTL = jax.nn.softmax(jnp.where(mask_TL, s_BHTL, -jnp.inf), axis=-1)
    return jnp.einsum("bhtl,blhk->bthk", p_BHTL, v_BLHK)


def dense_reference(model: FamModel, x_BT) -> jax.Array:
    """Alg. 2 written directly from the definitions with dense [T, F + T] masks, block by block."""
    cfg = model.cfg
    B, T = x_BT.shape
    S, M, F = cfg.block_size, cfg.memory_segments, cfg.fam_length
    pos_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.float32), (B, T))
    fam_pos = lambda n: jnp.broadcast_to((n + 1) * S - F + jnp.arange(F, dtype=jnp.float32), (B, F))
    # Layer l's F_0: the prompt through layers < l, FAM vectors attending to each other unmasked.
    fam = jnp.zeros((B, 0, cfg.d_model)) if F == 0 else jnp.broadcast_to(model.fam_init_FD[...], (B, F, cfg.d_model))
    x = model.embed(x_BT)
    i_T = jnp.arange(T)
    for blk in model.layers:
        mlp = lambda h, blk=blk: h + blk.mlp(blk.norm_mlp_in(h))
        q, k, v = blk.attn.project(blk.norm_attn_in(x), pos_BT)
        out_rows, fam_resid, fam_l = [], jnp.zeros_like(fam), fam
        for n in range(T // S):
            _, kf, vf = blk.attn.project(blk.norm_attn_in(fam_l), fam_pos(n - 1))
            # Token rows of block n: causal in-block, full on blocks n-M..n-1, full on KF_{n-1}.
            rows = slice(n * S, (n + 1) * S)
            qb = i_T[rows][:, None]
            tok_mask = ((i_T[None] // S == n) & (i_T[None] <= qb)) | ((i_T[None] // S >= n - M) & (i_T[None] // S < n))
            mask = jnp.concatenate([jnp.ones((S, F), bool), tok_mask], 1)
            o = _softmax_attend(q[:, rows], jnp.concatenate([kf, k], 1), jnp.concatenate([vf, v], 1), mask)
            out_rows.append(o)
            # FAM rows: KF_{n-1} and the whole block n, nothing else.
            qf, _, _ = blk.attn.project(blk.norm_attn_in(fam_l), fam_pos(n))
            fmask = jnp.concatenate([jnp.ones((F, F), bool), jnp.broadcast_to(i_T[None] // S == n, (F, T))], 1)
            of = _softmax_attend(qf, jnp.concatenate([kf, k], 1), jnp.concatenate([vf, v], 1), fmask)
            fam_l = mlp(fam_resid + blk.attn.output(of))
            fam_resid = fam_l
        x = mlp(x + blk.attn.output(jnp.concatenate(out_rows, 1)))
        # Carry the prompt up to the next layer.
        qp, kp, vp = blk.attn.project(blk.norm_attn_in(fam), fam_pos(-1))
        fam = mlp(fam + blk.attn.output(_softmax_attend(qp, kp, vp, jnp.ones((F, F), bool))))
    return model.head(x)


@pytest.mark.parametrize("kw", [{}, {"memory_segments": 2, "fam_length": 0}])
def test_matches_dense_mask_reference(kw):
    model = make(**kw)
    x = tokens(2, 16)
    logits, finals = jit_forward(model, x)
    assert logits.shape == (2, 16, TINY.vocab_size)
    assert finals.shape == (2, TINY.num_layers, model.cfg.fam_length, TINY.d_model)
    graphdef, state = nnx.split(model)
    expect = jax.jit(lambda s: dense_reference(nnx.merge(graphdef, s), x))(state)
    np.testing.assert_allclose(logits, expect, atol=2e-5, rtol=2e-5)


def test_rope_offset_invariance():
    """Rotary attention is relative, so shifting every position (tokens and FAM) leaves the logits unchanged."""
    model = make()
    x = tokens(2, 16)
    pos = jnp.broadcast_to(jnp.arange(16), (2, 16))
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, p: nnx.merge(graphdef, s).forward(x, positions_BT=p)[0])
    base, shifted = forward(state, pos), forward(state, pos + 1000)
    np.testing.assert_allclose(shifted, base, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("share_weights,block_size", [(False, 12), (True, 16)])
def test_reduces_to_looped_model(share_weights, block_size):
    """fam_length=0 and block_size >= T is the plain causal decoder: a looped checkpoint gives the same logits."""
    lcfg = LoopedConfig(
        vocab_size=29, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=48, num_layers=1, num_loops=3,
        share_weights=share_weights,
    )  # fmt: skip
    looped = LoopedModel(lcfg, rngs=nnx.Rngs(1))
    fam = FamModel(
        fam_config_from_looped(lcfg, block_size=block_size, memory_segments=0, fam_length=0), rngs=nnx.Rngs(2)
    )
    x = tokens(2, 12)
    call = lambda m: run(m, lambda m: m(x))
    expect = call(looped)
    assert not np.allclose(call(fam), expect, atol=1e-3)  # different weights before loading
    load_looped_params(fam, looped)
    np.testing.assert_allclose(call(fam), expect, atol=1e-5, rtol=1e-5)
    # With a FAM the weights still load (the prompt is the only extra parameter).
    with_fam = FamModel(fam_config_from_looped(lcfg, block_size=4, memory_segments=1, fam_length=2), rngs=nnx.Rngs(3))
    load_looped_params(with_fam, looped)
    np.testing.assert_array_equal(with_fam.layers[-1].mlp.down_FD[...], fam.layers[-1].mlp.down_FD[...])
    with pytest.raises(ValueError, match="num_layers"):
        load_looped_params(make(), looped)


@pytest.mark.parametrize("fam_length", [2, 0])
def test_streaming_matches_parallel(fam_length):
    model = make(fam_length=fam_length)
    x = tokens(2, 20)
    logits, finals = jit_forward(model, x)
    graphdef, state = nnx.split(model)
    step = jax.jit(lambda s, tok, c: nnx.merge(graphdef, s).decode_step(tok, c))
    cache = model.init_cache(2)
    shapes = jax.tree.map(lambda a: (a.shape, a.dtype), cache)
    out = []
    for t in range(20):
        lg, cache = step(state, x[:, t], cache)
        out.append(lg)
        assert jax.tree.map(lambda a: (a.shape, a.dtype), cache) == shapes  # the cache never grows
        if t == 19 and fam_length:
            fam_now = np.stack([c.fam_BFD for c in cache["layers"]], 1)
            np.testing.assert_allclose(fam_now, finals, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.stack(out, 1), logits, atol=1e-5, rtol=1e-5)
    W = model.cfg.window
    assert cache["layers"][0].k_BWGK.shape == (2, W, TINY.num_kv_heads, TINY.head_dim)


def test_gradient_flows_across_blocks_to_prompt():
    """Loss on the last block only: with full BPTT the prompt F_0 gets gradient through the FAM chain; with
    fam_stop_gradient the chain is cut and (2 layers, no memory segment, 3 blocks) it gets none."""
    x = tokens(2, 12)

    def prompt_grad(model):
        graphdef, params = nnx.split(model, nnx.Param)

        def loss(p):
            logits, _ = nnx.merge(graphdef, p).forward(x)
            return jnp.sum(logits[:, -4:] ** 2)

        return jax.jit(jax.grad(loss))(params)["fam_init_FD"][...]

    assert np.abs(prompt_grad(make(memory_segments=0))).max() > 1e-6
    np.testing.assert_array_equal(prompt_grad(make(memory_segments=0, fam_stop_gradient=True)), 0.0)


def test_random_state_passing_carry():
    model = make(state_passing_prob=1.0)
    B, T = 2, 12
    carry = model.initial_carry(B)
    assert carry["fam_BLFD"].shape == (B, TINY.num_layers, TINY.fam_length, TINY.d_model)
    assert carry["valid_B"].shape == (B,)
    assert make().initial_carry(B) is None
    x = tokens(B, T)
    batch = {"inputs": x, "targets": tokens(B, T, 1), "weights": jnp.ones((B, T)), "positions": jnp.arange(T)[None]}
    rng = jax.random.key(0)
    graphdef, state = nnx.split(model)
    loss_fn = jax.jit(lambda c, train: nnx.merge(graphdef, state).loss(batch, rng=rng, train=train, carry=c),
                      static_argnums=1)  # fmt: skip
    loss0, metrics0, carry1 = loss_fn(carry, True)
    _, finals = jit_forward(model, x)
    np.testing.assert_allclose(carry1["fam_BLFD"], finals, atol=1e-6)  # invalid carry -> started from the prompt
    np.testing.assert_array_equal(carry1["valid_B"], 1.0)
    assert float(metrics0["state_passed"]) == 0.0
    loss1, metrics1, carry2 = loss_fn(carry1, True)
    assert float(metrics1["state_passed"]) == 1.0 and not np.isclose(loss0, loss1)
    prev = [carry1["fam_BLFD"][:, i] for i in range(TINY.num_layers)]
    _, expect = jit_forward(model, x, init_fams=prev, init_resids=prev)
    np.testing.assert_allclose(carry2["fam_BLFD"], expect, atol=1e-6)
    # Evaluation never uses the carry.
    loss_eval, _, _ = loss_fn(carry1, False)
    np.testing.assert_allclose(loss_eval, loss0, rtol=1e-6)


def test_fit_threads_the_carry(tmp_path):
    """Fast sibling of the slow test below: one layer, one device, no evaluation. With
    state_passing_prob=1 the second step of ``fit`` starts from the first step's final FAM, which it
    can only do if fit handed the carry of step 1 to step 2 (``initial_carry`` is marked invalid)."""
    from looped_jax.config import CheckpointConfig, ExperimentConfig, OptimConfig, TrainConfig
    from looped_jax.data import DataConfig, prepare
    from looped_jax.train.trainer import Trainer

    data = DataConfig(
        name="passkey", data_dir=str(tmp_path / "data"), seq_len=16, passkey_digits=2, passkey_test_lens=(24,),
        num_train=32, num_test=8,
    )  # fmt: skip
    prepare(data)
    cfg = ExperimentConfig(
        model=dataclasses.replace(TINY, vocab_size=22, num_layers=1, state_passing_prob=1.0),
        data=data,
        optim=OptimConfig(warmup_steps=1),
        train=TrainConfig(num_steps=2, global_batch_size=4, log_every=1, output_dir=str(tmp_path / "run")),
        checkpoint=CheckpointConfig(enabled=False),
    )
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    trainer = Trainer(cfg, mesh=mesh, log=False)
    assert trainer.stateful
    state, history = trainer.fit()
    assert history["train"]["state_passed"] == 1.0  # step 2 started from step 1's FAM
    np.testing.assert_array_equal(np.asarray(state.carry["valid_B"]), 1.0)
    assert state.carry["fam_BLFD"].shape == (4, 1, TINY.fam_length, TINY.d_model)


@pytest.mark.slow
def test_trainer_with_carry(tmp_path):
    """The Trainer keeps the FAM carry across steps on PassKey data."""
    from looped_jax.config import CheckpointConfig, ExperimentConfig, OptimConfig, TrainConfig
    from looped_jax.data import DataConfig, prepare
    from looped_jax.train.trainer import Trainer

    data = DataConfig(
        name="passkey", data_dir=str(tmp_path / "data"), seq_len=16, passkey_digits=2, passkey_test_lens=(24,),
        num_train=64, num_test=8,
    )  # fmt: skip
    prepare(data)
    cfg = ExperimentConfig(
        model=dataclasses.replace(TINY, vocab_size=22, random_position_offset=True, state_passing_prob=0.8),
        data=data,
        optim=OptimConfig(warmup_steps=1),
        train=TrainConfig(num_steps=2, global_batch_size=8, log_every=1, output_dir=str(tmp_path / "run")),
        checkpoint=CheckpointConfig(enabled=False),
    )
    trainer = Trainer(cfg, log=False)
    assert trainer.stateful
    state, history = trainer.fit(eval_splits=("test_len24",))
    np.testing.assert_array_equal(np.asarray(state.carry["valid_B"]), 1.0)
    assert state.carry["fam_BLFD"].shape == (8, TINY.num_layers, TINY.fam_length, TINY.d_model)
    assert np.isfinite(history["train"]["loss"]) and 0.0 <= history["eval"]["test_len24"]["accuracy"] <= 1.0


def test_remat_same_gradients():
    """remat_policy recomputes each layer in the backward pass: one remat per layer in the gradient program, the
    same loss and gradients (the recomputed forward is the same program)."""
    x = tokens(2, 32)

    def grad_fn(model):
        graphdef, params = nnx.split(model, nnx.Param)

        def loss(p):
            logits, _ = nnx.merge(graphdef, p).forward(x)
            return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

        return jax.jit(jax.value_and_grad(loss))(params), str(jax.make_jaxpr(jax.grad(loss))(params))

    (loss0, g0), jaxpr0 = grad_fn(make(num_layers=3))
    (loss1, g1), jaxpr1 = grad_fn(make(num_layers=3, remat_policy="nothing_saveable"))
    assert jaxpr0.count("remat") == 0 and jaxpr1.count("remat") == 3
    np.testing.assert_allclose(loss1, loss0, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g1, g0)
    with pytest.raises(ValueError, match="remat_policy"):
        make(remat_policy="everything")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu (pip install '.[tpu]')")
def test_remat_cuts_tpu_activation_memory():
    """On one v5e chip (AOT), a 4-layer d 512 FAM over 2 x 2048 tokens: layer remat cuts the compiled temporary
    memory of the gradient (measured 954 -> 382 MiB). XLA:CPU's memory report does not show it at test sizes."""
    from looped_jax.aot import topology_devices
    from looped_jax.nn.platform import use_platform

    dev = topology_devices("v5e:2x2")[0]
    sh = jax.sharding.SingleDeviceSharding(dev)
    temp = {}
    for policy in ("", "nothing_saveable"):
        cfg = dict(d_model=512, num_heads=8, num_kv_heads=8, head_dim=64, mlp_dim=1536, num_layers=4)
        model = make(**cfg, block_size=256, fam_length=16, remat_policy=policy, attention_impl="xla")
        graphdef, params = nnx.split(model, nnx.Param)
        params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), params)
        x = jax.ShapeDtypeStruct((2, 2048), jnp.int32, sharding=sh)

        def loss(p, x):
            return jnp.mean(nnx.merge(graphdef, p).forward(x)[0])

        with use_platform("tpu"):
            compiled = jax.jit(jax.grad(loss)).trace(params, x).lower(lowering_platforms=("tpu",)).compile()
        temp[policy] = compiled.memory_analysis().temp_size_in_bytes
    assert temp["nothing_saveable"] < 0.6 * temp[""], temp
