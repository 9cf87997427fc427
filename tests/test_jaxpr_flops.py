"""Matmul FLOPs counted on jaxprs (``looped_jax.jaxpr_flops``): exact counts for dots, scans, conds, shard_map
and Pallas kernels (body x grid), and the train-step use: a dense stack's gradient step is 6 N per token."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.sharding import PartitionSpec as P

from looped_jax.jaxpr_flops import count


def test_dot_scan_cond_and_while():
    x, w = jnp.ones((4, 64)), jnp.ones((64, 32))
    dot = 2 * 4 * 64 * 32

    def f(x, w):
        ys = jax.lax.scan(lambda c, _: (c + 1.0, c @ w), x, None, length=3)[1]
        big = jax.lax.cond(x.sum() > 0, lambda: (x @ w) @ w.T, lambda: x)  # costlier branch: two dots
        n = jax.lax.while_loop(lambda c: c[0] < x.sum(), lambda c: (c[0] + 1.0, c[1] @ w @ w.T), (0.0, x))[1]
        return ys.sum() + big.sum() + n.sum()

    c = count(jax.make_jaxpr(f)(x, w))
    assert c["flops"] == 3 * dot + 2 * dot + 2 * dot
    assert c["loops_without_trip_count"] == 1 and c["kernel_flops"] == 0


def test_a_dot_that_contracts_nothing_is_a_product_not_a_matmul():
    """An outer product written as dot_general (no contraction, or a size-1 one) has no multiply-add; XLA rewrites
    it as a multiply, so neither the jaxpr nor the HLO count takes it (the CPU-compiled gradient agrees)."""
    from looped_jax.aot_hlo import hlo_stats

    a, b, w = jnp.ones((8, 1)), jnp.ones((1, 16)), jnp.ones((16, 4))
    outer = lambda a, b: jax.lax.dot_general(a[:, 0], b[0], (((), ()), ((), ())))  # noqa: E731
    assert count(jax.make_jaxpr(outer)(a, b))["flops"] == 0
    assert count(jax.make_jaxpr(lambda a, b: a @ b)(a, b))["flops"] == 0  # contracts a size-1 dim
    f = lambda a, b, w: jnp.sum(jnp.tanh(outer(a, b) @ w))  # noqa: E731
    g = jax.grad(f, argnums=(0, 1, 2))
    # the matmul forward, its weight and input gradients, and the outer product's two gradients, which do contract
    want = 2 * 8 * 16 * 4 * 3 + 2 * 8 * 16 * 2
    assert count(jax.make_jaxpr(g)(a, b, w))["flops"] == want
    assert hlo_stats(jax.jit(g).lower(a, b, w).compile().as_text())["flops"] == want


def test_loop_invariant_work_in_a_scan_counts_once():
    """A scan body's dots that read only its constants (the same on every iteration) count once, as XLA hoists
    them; those that read the carry or the per-step inputs count once per iteration, through nested calls too."""
    x, xs = jnp.ones((4, 64)), jnp.ones((5, 4, 64))
    w = jax.random.normal(jax.random.key(0), (3, 64, 64))
    dot = 2 * 4 * 64 * 64

    @jax.jit  # a nested call whose body mixes both kinds
    def mixed(c, x, w):
        return c @ w[0] + jnp.tanh(x @ w[1]) @ w[2]

    def f(x, w, xs):
        def body(c, x_t):
            return jnp.tanh(mixed(c, x, w) + x_t @ w[0]), None

        return jax.lax.scan(body, x, xs)[0].sum()

    # per iteration: c @ w0 and x_t @ w0; once: x @ w1 and tanh(.) @ w2, both invariant
    assert count(jax.make_jaxpr(f)(x, w, xs))["flops"] == 2 * dot + 5 * 2 * dot

    # the gradient's backward scan: the invariant forward dots are hoisted there as well, and the count
    # matches what XLA's optimized CPU program computes
    from looped_jax.aot_hlo import hlo_stats

    g = jax.grad(f, argnums=(0, 1))
    compiled = jax.jit(g).lower(x, w, xs).compile()
    assert count(jax.make_jaxpr(g)(x, w, xs))["flops"] == hlo_stats(compiled.as_text())["flops"]


def test_dense_stack_gradient_is_six_n_per_token_less_the_first_input_gradient():
    """value_and_grad over the weights of a 3-layer stack: forward 2N per token, backward 2N for the weight
    gradients and 2N for the activation gradients of layers 2 and 3 (the input needs none)."""
    dims = [(32, 64), (64, 48), (48, 16)]
    ws = [jnp.ones(d) for d in dims]
    x = jnp.ones((10, 32))

    def loss(ws, x):
        for w in ws:
            x = jnp.tanh(x @ w)
        return x.sum()

    n = [a * b for a, b in dims]
    want = 10 * (2 * sum(n) + 2 * sum(n) + 2 * sum(n[1:]))
    assert count(jax.make_jaxpr(jax.value_and_grad(loss))(ws, x))["flops"] == want


def test_pallas_kernel_counts_body_times_grid():
    def kernel(a_ref, b_ref, o_ref):
        o_ref[...] = jnp.dot(a_ref[...], b_ref[...])

    def matmul(a, b):
        return pl.pallas_call(
            kernel,
            grid=(a.shape[0] // 8, b.shape[1] // 16),
            in_specs=[
                pl.BlockSpec((8, a.shape[1]), lambda i, j: (i, 0)),
                pl.BlockSpec((b.shape[0], 16), lambda i, j: (0, j)),
            ],
            out_specs=pl.BlockSpec((8, 16), lambda i, j: (i, j)),
            out_shape=jax.ShapeDtypeStruct((a.shape[0], b.shape[1]), a.dtype),
            interpret=True,
        )(a, b)

    a, b = jnp.ones((32, 24)), jnp.ones((24, 48))
    np.testing.assert_allclose(matmul(a, b), a @ b)
    c = count(jax.make_jaxpr(lambda a, b: matmul(a, b) @ b.T)(a, b))
    assert c["kernel_flops"] == 2 * 32 * 24 * 48 and c["kernels"] == 1
    assert c["flops"] == 2 * 32 * 24 * 48 + 2 * 32 * 48 * 24

    # in a scan, a kernel on the loop's constants is needed once (model FLOPs), but XLA keeps its custom call in
    # the loop (the compiled program's kernel FLOPs); a kernel on the carry runs every iteration either way
    def loop(a, b):
        return jax.lax.scan(lambda c, _: (c + matmul(a, b)[:, :24] + matmul(c, b)[:, :24], None), a, length=4)[0]

    j = jax.make_jaxpr(loop)(a, b)
    one = 2 * 32 * 24 * 48
    assert count(j)["kernel_flops"] == one + 4 * one
    assert count(j, hoist_kernels=False)["kernel_flops"] == 8 * one


def test_shard_map_body_counts_once_per_shard():
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    x, w = jnp.ones((64, 32)), jnp.ones((32, 16))
    f = jax.shard_map(lambda x, w: x @ w, mesh=mesh, in_specs=(P("data"), P()), out_specs=P("data"))
    assert count(jax.make_jaxpr(f)(x, w))["flops"] == 2 * 64 * 32 * 16
