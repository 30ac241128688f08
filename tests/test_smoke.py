import jax
import jax.numpy as jnp
import numpy as np

import jaxnet as jn


def test_mlp_single_batch_vmap_jit_agree(key, rng):
    net = jn.serial(jn.Flatten(), jn.Dense(16), jn.relu, jn.Dense(3))
    x = jnp.asarray(rng.normal(size=(5, 4, 4)), jnp.float32)
    params = net.init(key, x[:1])
    y = net.apply(params, x)
    assert y.shape == (5, 3)
    np.testing.assert_allclose(net.apply(params, x[0]), y[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(jax.vmap(net.apply, (None, 0))(params, x), y, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(jax.jit(net.apply)(params, x), y, rtol=1e-5, atol=1e-6)
