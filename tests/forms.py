"""Checks and programs shared by the tests of the attention's forms (test_pallas,
test_pallas_gpu, and which form runs: test_measure, test_model)."""

import chex
import jax
import jax.numpy as jnp

from halonet import attention
from halonet.attention import choose
from tests import compile_flags

TRITON_CALL = '__gpu$xla.gpu.triton'  # The custom call of Pallas GPU kernels.


def jit(fn, impl: str):
  """jax.jit(fn), compiled with compile_flags.INTERPRETED_KERNELS where `impl` is the form
  whose kernels run in Pallas' interpreter on CPU ('pallas_gpu')."""
  jitted = jax.jit(fn)
  if impl != 'pallas_gpu':
    return jitted
  return lambda *args: jitted.lower(*args).compile(compile_flags.INTERPRETED_KERNELS)(*args)


def assert_matches_plain_form(impl: str, input_shape: tuple[int, ...], **layer_args) -> None:
  """The layer's output and gradients (parameters and input) with `impl` equal the plain form's,
  for a random input and cotangent."""
  x = jax.random.normal(jax.random.key(0), input_shape)
  layers = {
    form: attention.HaloAttention(**layer_args, attention=attention.AttentionPlan(form))
    for form in ('plain', impl)
  }
  variables = layers['plain'].init(jax.random.key(1), x)
  cotangent = jax.random.normal(jax.random.key(2), layers['plain'].apply(variables, x).shape)
  results = {
    form: jit(
      jax.value_and_grad(lambda v, x: (layer.apply(v, x) * cotangent).sum(), argnums=(0, 1)),
      form,
    )(variables, x)
    for form, layer in layers.items()
  }
  chex.assert_trees_all_close(results[impl], results['plain'], rtol=1e-5, atol=1e-5)


def h1_layer_fwd_bwd_lowered(impl: str, platform: str) -> str:
  """H1's stage-1 attention layer, forward and backward, bfloat16, 2 images, lowered for
  `platform` ('tpu' or 'cuda') with jax.export: the module text."""
  layer = attention.HaloAttention(
    qk_width=64,
    value_width=64,
    num_heads=4,
    block_size=8,
    halo_size=3,
    attention=attention.AttentionPlan(impl),
    dtype=jnp.bfloat16,
  )
  x = jax.ShapeDtypeStruct((2, 64, 64, 64), jnp.bfloat16)
  params = jax.eval_shape(layer.init, jax.random.key(0), x)
  loss = lambda p, x: layer.apply(p, x).astype(jnp.float32).sum()
  return jax.export.export(
    jax.jit(jax.grad(loss, argnums=(0, 1))),
    platforms=(platform,),
    disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL)],
  )(params, x).mlir_module()


def record_forms_used(monkeypatch, names: tuple[str, ...]) -> list[str]:
  """The list each call of the named forms appends its name to, for the rest of the test."""
  used = []
  for name in names:
    form = choose.IMPLEMENTATIONS[name]
    spy = lambda *a, _form=form, _name=name, **k: used.append(_name) or _form(*a, **k)
    monkeypatch.setitem(choose.IMPLEMENTATIONS, name, spy)
  return used
