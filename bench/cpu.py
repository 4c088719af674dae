"""CPU timings: the H1 train step and each H1 attention layer against timm, and the matmul peak.

Every figure that matters is a ratio of two timings taken side by side in one run (interleaved,
best of several), because the absolute speed of a shared CPU drifts.
"""

from typing import Any

import jax
import jax.numpy as jnp

from bench import common


def matmul_peak(size: int, repeats: int) -> dict[str, float]:
  """FLOP/s of one large square jnp.dot per dtype: the machine's achievable GEMM rate."""
  fns = {}
  for name, dtype in common.DTYPES.items():
    a = jnp.ones((size, size), dtype)
    f = jax.jit(lambda a: a @ a)
    fns[name] = lambda f=f, a=a: jax.block_until_ready(f(a))
  seconds = common.seconds_of(common.best_of(fns, repeats))
  return {name: 2 * size**3 / s for name, s in seconds.items()}


def train_step(timm_or_reason, batch: int, tiny: bool, repeats: int) -> dict[str, Any]:
  """Images/s of our H1 train step (float32 with 'auto' = the row loop here, float32 with the
  plain attention, bfloat16) and of timm's halonet_h1 (float32), interleaved."""
  variants = {
    'ours_float32': {'model.dtype': 'float32'},
    'ours_float32_plain': {'model.dtype': 'float32', 'model.attention_impl': 'plain'},
    'ours_bfloat16': {'model.dtype': 'bfloat16'},
  }
  fns = {
    name: common.timed_train_step(common.variant_config('h1', tiny=tiny, **overrides), batch)
    for name, overrides in variants.items()
  }
  image_size = common.variant_config('h1', tiny=tiny).image_size
  timm_skipped = None
  if tiny:
    timm_skipped = 'tiny: timm halonet_h1 needs 256 px'
  elif isinstance(timm_or_reason, str):
    timm_skipped = timm_or_reason
  else:
    torch, timm = timm_or_reason
    net = timm.create_model('halonet_h1', num_classes=1000).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    images = torch.zeros(batch, 3, image_size, image_size)
    labels = torch.zeros(batch, dtype=torch.long)

    def run_timm():
      opt.zero_grad(set_to_none=True)
      torch.nn.functional.cross_entropy(net(images), labels).backward()
      opt.step()

    fns['timm_float32'] = run_timm
  timings = common.best_of(fns, repeats + 2)  # The headline figure: more runs.
  seconds = common.seconds_of(timings)
  result = {
    'batch': batch,
    'image_size': image_size,
    'seconds': seconds,
    'images_per_s': {k: batch / v for k, v in seconds.items()},
    'kernel_seconds': {k: t['kernel_seconds'] for k, t in timings.items()},
    'page_faults': {k: t['page_faults'] for k, t in timings.items()},
    'auto_vs_plain': seconds['ours_float32_plain'] / seconds['ours_float32'],
    'timm_skipped': timm_skipped,
  }
  if not timm_skipped:
    result['speedup_vs_timm'] = seconds['timm_float32'] / seconds['ours_float32']
    result['speedup_vs_timm_bf16'] = seconds['timm_float32'] / seconds['ours_bfloat16']
  return result


def attention_layers(
  timm_or_reason, batch: int, tiny: bool, repeats: int, peak: dict[str, float]
) -> dict[str, Any]:
  """Per distinct H1 attention layer: fwd+bwd time of each implementation and of timm's
  HaloAttn, and achieved FLOP/s over the matmul peak (FLOPs of the loop-free plain form, which
  XLA's cost analysis counts in full)."""
  layers = common.attention_layer_shapes(common.variant_config('h1', tiny=tiny), tiny)
  runs = [('rows', 'float32'), ('rows', 'bfloat16'), ('plain', 'float32')]
  results = {}
  for layer in layers:
    fns, flops = {}, {}
    for impl, dname in runs:
      compiled, args = common.attention_fwd_bwd(layer, batch, common.DTYPES[dname], impl)
      fns[f'{impl}_{dname}'] = lambda c=compiled, a=args: jax.block_until_ready(c(*a))
    for dname, dtype in common.DTYPES.items():
      plain = common.attention_fwd_bwd(layer, batch, dtype, 'plain')[0]
      flops[dname] = plain.cost_analysis()['flops']
    if not isinstance(timm_or_reason, str):
      torch, _ = timm_or_reason
      from timm.layers.halo_attn import HaloAttn  # pylint: disable=import-outside-toplevel

      timm_layer = HaloAttn(
        layer['input'][2],
        layer['value_width'],
        num_heads=layer['num_heads'],
        block_size=layer['block_size'],
        halo_size=layer['halo_size'],
        stride=layer['stride'],
        qk_ratio=layer['qk_width'] / layer['value_width'],
      )
      x = torch.randn(batch, layer['input'][2], *layer['input'][:2], requires_grad=True)

      def run_timm(timm_layer=timm_layer, x=x):
        timm_layer.zero_grad(set_to_none=True)
        x.grad = None
        timm_layer(x).sum().backward()

      fns['timm_float32'] = run_timm
    seconds = common.seconds_of(common.best_of(fns, repeats))
    row = {
      'input': [batch, *layer['input']],
      'heads': layer['num_heads'],
      'stride': layer['stride'],
      'blocks': layer['count'],
      'seconds': seconds,
      'xla_flops': flops['float32'],
    }
    for impl, dname in runs:
      achieved = flops[dname] / seconds[f'{impl}_{dname}']
      row[f'fraction_of_matmul_peak_{impl}_{dname}'] = achieved / peak[dname]
    if 'timm_float32' in seconds:
      row['speedup_vs_timm'] = seconds['timm_float32'] / seconds['rows_float32']
    results[layer['name']] = row
  return results


def format_results(results: dict[str, Any]) -> str:
  """The CPU section as text tables."""
  train, peak = results['train_step'], results['matmul_peak_flops_per_s']
  lines = [
    f'Train step, H1, batch {train["batch"]}, {train["image_size"]} px:',
    f'  {"":20s} {"images/s":>8s} {"kernel s":>8s} {"page faults":>11s}',
  ]
  for name, v in train['images_per_s'].items():
    lines.append(
      f'  {name:20s} {v:8.2f} {train["kernel_seconds"][name]:8.2f} {train["page_faults"][name]:11d}'
    )
  lines.append(f"  'auto' (row loop) vs plain attention, float32: {train['auto_vs_plain']:.2f}x")
  if train['timm_skipped']:
    lines.append(f'  timm skipped: {train["timm_skipped"]}')
  else:
    lines.append(
      f'  speedup vs timm: {train["speedup_vs_timm"]:.2f}x (f32), '
      f'{train["speedup_vs_timm_bf16"]:.2f}x (bf16)'
    )
  lines += [
    '',
    f'Attention fwd+bwd (matmul peak f32 {peak["float32"] / 1e9:.0f} GFLOP/s, '
    f'bf16 {peak["bfloat16"] / 1e9:.0f} GFLOP/s)',
    f'  {"layer":14s} {"rows f32 ms":>11s} {"rows bf16 ms":>12s} {"plain f32 ms":>12s} '
    f'{"timm ms":>8s} {"vs timm":>8s} {"rows %peak":>10s}',
  ]
  for name, r in results['attention'].items():
    s = r['seconds']
    timm_ms = f'{s["timm_float32"] * 1e3:8.1f}' if 'timm_float32' in s else f'{"-":>8s}'
    speedup = f'{r["speedup_vs_timm"]:7.2f}x' if 'speedup_vs_timm' in r else f'{"-":>8s}'
    lines.append(
      f'  {name:14s} {s["rows_float32"] * 1e3:11.1f} {s["rows_bfloat16"] * 1e3:12.1f} '
      f'{s["plain_float32"] * 1e3:12.1f} {timm_ms} {speedup} '
      f'{r["fraction_of_matmul_peak_rows_float32"]:10.1%}'
    )
  return '\n'.join(lines)
