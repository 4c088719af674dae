"""CPU benchmark of HaloNet-H1: train step and halo attention against timm, and memory vs size.

Every figure that matters is a ratio of two timings taken side by side in this run (interleaved,
best of several), because the absolute speed of a shared CPU drifts. Writes bench/results.json
and prints a table. `python bench/run.py --tiny` runs in seconds on toy shapes (the smoke test).
"""

import argparse
import functools
import json
import os
import platform
import resource
import sys
import time

# Threads must be fixed before jax (XLA's Eigen pool) and torch are imported.
_parser = argparse.ArgumentParser(description=__doc__)
_parser.add_argument('--tiny', action='store_true', help='toy shapes: a smoke test, not a benchmark')
_parser.add_argument('--out', default=os.path.join(os.path.dirname(__file__), 'results.json'))
_parser.add_argument('--threads', type=int, default=os.cpu_count())
_parser.add_argument('--batch', type=int, default=8, help='train step and attention batch')
_parser.add_argument('--repeats', type=int, default=3, help='timed runs per measurement')
_parser.add_argument('--skip-timm', action='store_true', help='ours only, even if timm is installed')
ARGS = _parser.parse_args() if __name__ == '__main__' else None
if ARGS is not None:
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_cpu_multi_thread_eigen=true'
                             f' intra_op_parallelism_threads={ARGS.threads}').strip()
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from configs import h1  # noqa: E402
from halonet import attention, model as model_lib  # noqa: E402

# (name, input map side, width, heads, stride) of each distinct HaloAttention call in H1 at 256 px.
H1_ATTENTION_SHAPES = [
    ('stage1', 64, 64, 4, 1),
    ('stage2_first', 64, 128, 8, 2),
    ('stage2', 32, 128, 8, 1),
    ('stage3_first', 32, 256, 8, 2),
    ('stage3', 16, 256, 8, 1),
    ('stage4_first', 16, 512, 8, 2),
    ('stage4', 8, 512, 8, 1),
]
TINY_ATTENTION_SHAPES = [('stage1', 16, 16, 2, 1), ('stage2_first', 16, 32, 4, 2)]
MEMORY_SIZES = (128, 256, 512)
TINY_MEMORY_SIZES = (32, 64)
_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def load_timm():
  """(torch, timm) or a string saying why the timm comparison is skipped."""
  if ARGS.skip_timm:
    return '--skip-timm'
  try:
    import timm  # pylint: disable=import-outside-toplevel
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    return f'not installed ({e.name}); pip install -r bench/requirements.txt'
  torch.set_num_threads(ARGS.threads)
  return torch, timm


def best_of(fns: dict, repeats: int) -> dict[str, dict[str, float]]:
  """The fastest run of each callable, run round-robin so drifts in CPU load hit all of them.

  Each run also records the kernel CPU time and page faults it caused (process-wide, but only
  the timed callable is running): on a VM, a step that gets fresh pages from the kernel pays for
  zeroing them, and that cost depends on what else freed memory.
  """
  for fn in fns.values():
    fn()  # Warm-up (compilation, allocator).
  runs = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      time.sleep(0.2)  # Lets the previous call's worker threads (XLA's or OpenMP's) go idle.
      before = resource.getrusage(resource.RUSAGE_SELF)
      start = time.perf_counter()
      fn()
      seconds = time.perf_counter() - start
      after = resource.getrusage(resource.RUSAGE_SELF)
      runs[name].append({'seconds': seconds, 'kernel_seconds': after.ru_stime - before.ru_stime,
                         'page_faults': after.ru_minflt - before.ru_minflt})
  return {name: min(r, key=lambda run: run['seconds']) for name, r in runs.items()}


def seconds_of(timings: dict[str, dict[str, float]]) -> dict[str, float]:
  """Just the seconds of best_of's runs."""
  return {name: run['seconds'] for name, run in timings.items()}


def h1_config(tiny: bool, image_size: int | None = None, dtype: str = 'float32'
              ) -> ml_collections.ConfigDict:
  """configs/h1.py; the tiny variant has one block per stage."""
  config = h1.get_config()
  config.model.dtype = dtype
  if tiny:
    config.model.stage_depths = (1, 1, 1, 1)
    config.image_size = 64
  if image_size:
    config.image_size = image_size
  return config


@functools.cache
def make_train_step(config_json: str, batch: int):
  """A compiled SGD-momentum train step (forward, backward, update) and its initial arguments.

  Cached on the config, so the memory section reuses the timed step's compilation.
  """
  config = ml_collections.ConfigDict(json.loads(config_json))
  model = model_lib.create_model(config)
  tx = optax.sgd(0.1, momentum=0.9, nesterov=True)
  images = jnp.zeros((batch, config.image_size, config.image_size, 3), jnp.float32)
  labels = jnp.zeros((batch,), jnp.int32)
  variables = jax.jit(lambda rng: model.init(rng, images, train=False))(jax.random.key(0))
  params, batch_stats = variables['params'], variables['batch_stats']

  def step(params, batch_stats, opt_state, images, labels):
    def loss_fn(params):
      logits, updates = model.apply({'params': params, 'batch_stats': batch_stats}, images,
                                    train=True, mutable=['batch_stats'])
      one_hot = jax.nn.one_hot(labels, logits.shape[-1])
      return optax.softmax_cross_entropy(logits, one_hot).mean(), updates['batch_stats']
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss

  args = (params, batch_stats, tx.init(params), images, labels)
  return jax.jit(step, donate_argnums=(0, 1, 2)).lower(*args).compile(), args


def bench_train_step(timm_or_reason, batch: int) -> dict:
  """Images/s of our H1 train step (float32 and bfloat16) and of timm's halonet_h1 (float32)."""
  state = {}
  fns = {}
  for dtype in ('float32', 'bfloat16'):
    step, args = make_train_step(h1_config(ARGS.tiny, dtype=dtype).to_json(), batch)
    state[dtype] = list(args)

    def run(step=step, dtype=dtype):
      out = step(*state[dtype])
      jax.block_until_ready(out)
      state[dtype][:3] = out[:3]
    fns[f'ours_{dtype}'] = run
  timm_skipped = None
  if ARGS.tiny:
    timm_skipped = 'tiny: timm halonet_h1 needs 256 px'
  elif isinstance(timm_or_reason, str):
    timm_skipped = timm_or_reason
  else:
    torch, timm = timm_or_reason
    net = timm.create_model('halonet_h1', num_classes=1000).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    images = torch.zeros(batch, 3, 256, 256)
    labels = torch.zeros(batch, dtype=torch.long)

    def run_timm():
      opt.zero_grad(set_to_none=True)
      torch.nn.functional.cross_entropy(net(images), labels).backward()
      opt.step()
    fns['timm_float32'] = run_timm
  timings = best_of(fns, ARGS.repeats + 2)  # The headline figure: more runs.
  seconds = seconds_of(timings)
  result = {'batch': batch, 'image_size': h1_config(ARGS.tiny).image_size,
            'seconds': seconds, 'images_per_s': {k: batch / v for k, v in seconds.items()},
            'kernel_seconds': {k: t['kernel_seconds'] for k, t in timings.items()},
            'page_faults': {k: t['page_faults'] for k, t in timings.items()},
            'timm_skipped': timm_skipped}
  if not timm_skipped:
    result['train_step_speedup_vs_timm'] = seconds['timm_float32'] / seconds['ours_float32']
    result['train_step_speedup_vs_timm_bf16'] = seconds['timm_float32'] / seconds['ours_bfloat16']
  return result


def matmul_peak(size: int) -> dict:
  """FLOP/s of one large square jnp.dot per dtype: the CPU's achievable GEMM rate."""
  fns = {}
  for name, dtype in _DTYPES.items():
    a = jnp.ones((size, size), dtype)
    f = jax.jit(lambda a: a @ a)
    fns[name] = lambda f=f, a=a: jax.block_until_ready(f(a))
  seconds = seconds_of(best_of(fns, ARGS.repeats + 2))
  return {name: 2 * size ** 3 / s for name, s in seconds.items()}


def attention_fwd_bwd(side: int, width: int, heads: int, stride: int, batch: int, dtype,
                      block: int = 8, halo: int = 3, rows_per_step: int = 1):
  """Compiled grad of sum(HaloAttention(x)) wrt params and x, with its arguments."""
  layer = attention.HaloAttention(qk_width=width, value_width=width, num_heads=heads,
                                  block_size=block, halo_size=halo, stride=stride, dtype=dtype,
                                  rows_per_step=rows_per_step)
  x = jax.random.normal(jax.random.key(0), (batch, side, side, width))
  params = layer.init(jax.random.key(1), x)['params']
  loss = lambda p, x: layer.apply({'params': p}, x).astype(jnp.float32).sum()
  return jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile(), (params, x)


def bench_attention(timm_or_reason, batch: int, peak: dict) -> dict:
  """Per stage shape: our layer's fwd+bwd time, FLOP/s vs matmul peak, and timm's HaloAttn time."""
  shapes = TINY_ATTENTION_SHAPES if ARGS.tiny else H1_ATTENTION_SHAPES
  results = {}
  for name, side, width, heads, stride in shapes:
    fns, flops = {}, {}
    for dname, dtype in _DTYPES.items():
      compiled, args = attention_fwd_bwd(side, width, heads, stride, batch, dtype)
      # Counted on the loop-free form: XLA's cost analysis counts a loop body once.
      flops[dname] = attention_fwd_bwd(side, width, heads, stride, batch, dtype,
                                       rows_per_step=0)[0].cost_analysis()['flops']
      fns[f'ours_{dname}'] = lambda c=compiled, a=args: jax.block_until_ready(c(*a))
    if not isinstance(timm_or_reason, str):
      torch, _ = timm_or_reason
      from timm.layers.halo_attn import HaloAttn  # pylint: disable=import-outside-toplevel
      layer = HaloAttn(width, width, num_heads=heads, block_size=8, halo_size=3, stride=stride,
                       qk_ratio=1.0)
      x = torch.randn(batch, width, side, side, requires_grad=True)

      def run_timm(layer=layer, x=x):
        layer.zero_grad(set_to_none=True)
        x.grad = None
        layer(x).sum().backward()
      fns['timm_float32'] = run_timm
    seconds = seconds_of(best_of(fns, ARGS.repeats))
    row = {'input': [batch, side, side, width], 'heads': heads, 'stride': stride,
           'seconds': seconds, 'xla_flops': flops['float32']}
    for dname in _DTYPES:
      achieved = flops[dname] / seconds[f'ours_{dname}']
      row[f'flops_per_s_{dname}'] = achieved
      row[f'fraction_of_matmul_peak_{dname}'] = achieved / peak[dname]
    if 'timm_float32' in seconds:
      row['speedup_vs_timm'] = seconds['timm_float32'] / seconds['ours_float32']
    results[name] = row
  return results


def compiled_bytes(compiled) -> dict[str, int]:
  """Temp, argument and output bytes of a compiled executable (XLA's static buffer plan)."""
  m = compiled.memory_analysis()
  parts = {'temp': m.temp_size_in_bytes, 'argument': m.argument_size_in_bytes,
           'output': m.output_size_in_bytes}
  return {**parts, 'total': sum(parts.values())}


def growth_exponent(pixels: list[int], values: list[float]) -> float:
  """Slope of log(value) against log(pixels): 1 is linear in pixel count, 2 quadratic."""
  return float(np.polyfit(np.log(pixels), np.log(values), 1)[0])


def bench_memory(batch: int) -> dict:
  """Peak bytes vs image size: the H1 train step, and stage-1 halo vs global attention layers.

  Global attention is the same layer with one block covering the whole map and no halo, so it
  differs from the halo layer only in neighbourhood size.
  """
  sizes = TINY_MEMORY_SIZES if ARGS.tiny else MEMORY_SIZES
  rows = []
  for size in sizes:
    network = compiled_bytes(
        make_train_step(h1_config(ARGS.tiny, image_size=size).to_json(), batch)[0])
    side, (_, _, width, heads, _) = size // 4, H1_ATTENTION_SHAPES[0]
    halo_layer = compiled_bytes(attention_fwd_bwd(side, width, heads, 1, batch, jnp.float32)[0])
    global_layer = compiled_bytes(attention_fwd_bwd(side, width, heads, 1, batch, jnp.float32,
                                                    block=side, halo=0)[0])
    rows.append({'image_size': size, 'train_step_bytes': network,
                 'stage1_halo_attention_bytes': halo_layer,
                 'stage1_global_attention_bytes': global_layer})
  pixels = [r['image_size'] ** 2 for r in rows]
  exponent = lambda key: growth_exponent(pixels, [r[key]['temp'] for r in rows])
  return {'batch': batch, 'rows': rows,
          'memory_growth_exponent': exponent('train_step_bytes'),
          'memory_growth_exponent_halo_attention': exponent('stage1_halo_attention_bytes'),
          'memory_growth_exponent_global_attention': exponent('stage1_global_attention_bytes')}


def machine_info(timm_or_reason) -> dict:
  info = {'platform': platform.platform(), 'processor': platform.processor(),
          'cpu_count': os.cpu_count(), 'threads': ARGS.threads, 'python': platform.python_version(),
          'jax': jax.__version__, 'jax_devices': [str(d) for d in jax.devices()],
          'glibc_tunables': os.environ.get('GLIBC_TUNABLES')}  # malloc settings, if any.
  try:
    with open('/proc/cpuinfo') as f:
      info['cpu_model'] = next(l.split(':', 1)[1].strip() for l in f if l.startswith('model name'))
  except (OSError, StopIteration):
    pass
  if not isinstance(timm_or_reason, str):
    torch, timm = timm_or_reason
    info.update(torch=torch.__version__, timm=timm.__version__,
                torch_threads=torch.get_num_threads())
  return info


def print_table(results: dict) -> None:
  train = results['train_step']
  print(f"\nTrain step, batch {train['batch']}, {train['image_size']} px:")
  print(f"  {'':16s} {'images/s':>8s} {'kernel s':>8s} {'page faults':>11s}")
  for name, v in train['images_per_s'].items():
    print(f"  {name:16s} {v:8.2f} {train['kernel_seconds'][name]:8.2f} "
          f"{train['page_faults'][name]:11d}")
  if train['timm_skipped']:
    print(f"  timm skipped: {train['timm_skipped']}")
  else:
    print(f"  speedup vs timm: {train['train_step_speedup_vs_timm']:.2f}x (f32), "
          f"{train['train_step_speedup_vs_timm_bf16']:.2f}x (bf16)")
  peak = results['matmul_peak_flops_per_s']
  print(f"\nAttention fwd+bwd (matmul peak f32 {peak['float32'] / 1e9:.0f} GFLOP/s, "
        f"bf16 {peak['bfloat16'] / 1e9:.0f} GFLOP/s)")
  print(f"  {'stage':14s} {'ours f32 ms':>11s} {'ours bf16 ms':>12s} {'timm ms':>8s} "
        f"{'vs timm':>8s} {'f32 %peak':>9s} {'bf16 %peak':>10s}")
  for name, r in results['attention'].items():
    s = r['seconds']
    timm_ms = f"{s['timm_float32'] * 1e3:8.1f}" if 'timm_float32' in s else f"{'-':>8s}"
    speedup = f"{r['speedup_vs_timm']:7.2f}x" if 'speedup_vs_timm' in r else f"{'-':>8s}"
    print(f"  {name:14s} {s['ours_float32'] * 1e3:11.1f} {s['ours_bfloat16'] * 1e3:12.1f} "
          f"{timm_ms} {speedup} {r['fraction_of_matmul_peak_float32']:9.1%} "
          f"{r['fraction_of_matmul_peak_bfloat16']:10.1%}")
  mem = results['memory']
  print(f"\nMemory (MiB, temp + argument + output), batch {mem['batch']}:")
  print(f"  {'px':>4s} {'H1 step':>9s} {'halo attn':>10s} {'global attn':>12s}")
  for r in mem['rows']:
    mib = lambda key: r[key]['total'] / 2 ** 20
    print(f"  {r['image_size']:4d} {mib('train_step_bytes'):9.1f} "
          f"{mib('stage1_halo_attention_bytes'):10.1f} {mib('stage1_global_attention_bytes'):12.1f}")
  print(f"  growth exponent of temp bytes in pixel count: H1 step "
        f"{mem['memory_growth_exponent']:.2f}, halo layer "
        f"{mem['memory_growth_exponent_halo_attention']:.2f}, global layer "
        f"{mem['memory_growth_exponent_global_attention']:.2f}")


def main() -> None:
  timm_or_reason = load_timm()
  batch = 2 if ARGS.tiny else ARGS.batch
  results = {'tiny': ARGS.tiny, 'machine': machine_info(timm_or_reason),
             'timm_skipped': timm_or_reason if isinstance(timm_or_reason, str) else None}
  print('matmul peak...', flush=True)
  peak = results['matmul_peak_flops_per_s'] = matmul_peak(256 if ARGS.tiny else 4096)
  print('train step...', flush=True)
  results['train_step'] = bench_train_step(timm_or_reason, batch)
  print('attention layers...', flush=True)
  results['attention'] = bench_attention(timm_or_reason, batch, peak)
  print('memory (compile only)...', flush=True)
  results['memory'] = bench_memory(batch if ARGS.tiny else 2)
  train = results['train_step']
  # Headline ratios, one named field each.
  results['train_step_speedup_vs_timm'] = train.get('train_step_speedup_vs_timm')
  results['train_step_speedup_vs_timm_bf16'] = train.get('train_step_speedup_vs_timm_bf16')
  for dname in _DTYPES:
    results[f'attention_fraction_of_matmul_peak_{dname}'] = {
        k: r[f'fraction_of_matmul_peak_{dname}'] for k, r in results['attention'].items()}
  results['attention_speedup_vs_timm'] = {
      k: r.get('speedup_vs_timm') for k, r in results['attention'].items()}
  for key in ('memory_growth_exponent', 'memory_growth_exponent_halo_attention',
              'memory_growth_exponent_global_attention'):
    results[key] = results['memory'][key]
  with open(ARGS.out, 'w') as f:
    json.dump(results, f, indent=2)
  print_table(results)
  print(f'\nwrote {ARGS.out}')


if __name__ == '__main__':
  main()
