"""Checks shared by the tests of the attention's fused forms (test_pallas, test_pallas_gpu)."""

import chex
import jax

from halonet import attention


def assert_matches_plain_form(impl: str, input_shape: tuple[int, ...], **layer_args) -> None:
  """The layer's output and gradients (parameters and input) with `impl` equal the plain form's,
  for a random input and cotangent."""
  x = jax.random.normal(jax.random.key(0), input_shape)
  layers = {
    form: attention.HaloAttention(**layer_args, attention_impl=form) for form in ('plain', impl)
  }
  variables = layers['plain'].init(jax.random.key(1), x)
  cotangent = jax.random.normal(jax.random.key(2), layers['plain'].apply(variables, x).shape)
  results = {
    form: jax.jit(
      jax.value_and_grad(lambda v, x: (layer.apply(v, x) * cotangent).sum(), argnums=(0, 1))
    )(variables, x)
    for form, layer in layers.items()
  }
  chex.assert_trees_all_close(results[impl], results['plain'], rtol=1e-5, atol=1e-5)
