"""Benchmark of HaloNet: speed against timm, arithmetic intensity and memory, on CPU or accelerator.

    python bench/run.py                      # sections for this machine; writes bench/results.json
    python bench/run.py --tiny --out /tmp/r.json   # toy shapes in seconds: the smoke test

Sections (--sections; default: cpu,costs on a CPU, accelerator,costs on a GPU/TPU):
  cpu          H1 train step and each H1 attention layer against timm on this CPU (bench/cpu.py)
  costs        compile-only: FLOP/byte per attention layer and implementation, memory per
               device batch with and without remat, memory growth (bench/costs.py)
  accelerator  H1/H7 bfloat16 train-step images/s and MFU, timm's H1 beside (bench/accelerator.py)
"""

import argparse
import json
import os
import platform
import sys

# XLA flags must be set before jax is imported.
_parser = argparse.ArgumentParser(
  description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
)
_parser.add_argument(
  '--tiny', action='store_true', help='toy shapes: a smoke test, not a benchmark'
)
_parser.add_argument('--out', default=os.path.join(os.path.dirname(__file__), 'results.json'))
_parser.add_argument('--sections', default='', help='comma-separated: cpu, costs, accelerator')
_parser.add_argument(
  '--threads',
  type=int,
  default=os.cpu_count(),
  help="torch's CPU threads; XLA:CPU always uses every core (no flag sets it), "
  'so keep the default for a like-for-like comparison',
)
_parser.add_argument('--batch', type=int, default=8, help='CPU train step and attention batch')
_parser.add_argument('--h1-batch', type=int, default=64, help='accelerator per-device batch, H1')
_parser.add_argument('--h7-batch', type=int, default=16, help='accelerator per-device batch, H7')
_parser.add_argument('--repeats', type=int, default=3, help='timed runs per measurement')
_parser.add_argument(
  '--skip-timm', action='store_true', help='ours only, even if timm is installed'
)
ARGS = _parser.parse_args()
os.environ['XLA_FLAGS'] = ' '.join(
  [
    os.environ.get('XLA_FLAGS', ''),
    '--xla_cpu_multi_thread_eigen=true',
    # XLA:CPU otherwise expands remat's optimization barriers and CSEs the recomputation away, so
    # its buffer plan would not show what remat saves on a TPU or GPU.
    '--xla_disable_hlo_passes=cse_barrier_expander',
  ]
).strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_timm():
  """(torch, timm) or a string saying why the timm comparison is skipped.

  Called before jax and TensorFlow load: triton's native module, which torchvision pulls in,
  segfaults when it loads after them.
  """
  if ARGS.skip_timm:
    return '--skip-timm'
  try:
    import timm  # pylint: disable=import-outside-toplevel
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    return f'not installed ({e.name}); pip install -r bench/requirements.txt'
  return torch, timm


TIMM_OR_REASON = load_timm()

import jax  # noqa: E402

from bench import accelerator  # noqa: E402
from bench import costs  # noqa: E402
from bench import cpu  # noqa: E402
from halonet.attention import measure  # noqa: E402


def machine_info(timm_or_reason) -> dict:
  info = {
    'platform': platform.platform(),
    'processor': platform.processor(),
    'cpu_count': os.cpu_count(),
    'threads': ARGS.threads,
    'python': platform.python_version(),
    'jax': jax.__version__,
    'backend': jax.default_backend(),
    'jax_devices': [str(d) for d in jax.devices()],
    'glibc_tunables': os.environ.get('GLIBC_TUNABLES'),
  }  # malloc settings, if any.
  try:
    with open('/proc/cpuinfo') as f:
      info['cpu_model'] = next(
        line.split(':', 1)[1].strip() for line in f if line.startswith('model name')
      )
  except (OSError, StopIteration):
    pass
  if not isinstance(timm_or_reason, str):
    torch, timm = timm_or_reason
    info.update(
      torch=torch.__version__, timm=timm.__version__, torch_threads=torch.get_num_threads()
    )
  return info


def headline(results: dict) -> dict:
  """The figures the README quotes, one named field each."""
  figures = {}
  if 'cpu' in results:
    train, layers = results['cpu']['train_step'], results['cpu']['attention']
    figures.update(
      train_step_speedup_vs_timm=train.get('speedup_vs_timm'),
      train_step_speedup_vs_timm_bf16=train.get('speedup_vs_timm_bf16'),
      train_step_auto_vs_plain=train['auto_vs_plain'],
      attention_speedup_vs_timm={k: r.get('speedup_vs_timm') for k, r in layers.items()},
      attention_fraction_of_matmul_peak_float32={
        k: r['fraction_of_matmul_peak_rows_float32'] for k, r in layers.items()
      },
      attention_fraction_of_matmul_peak_bfloat16={
        k: r['fraction_of_matmul_peak_rows_bfloat16'] for k, r in layers.items()
      },
    )
  if 'costs' in results:
    c = results['costs']
    figures.update(
      attention_flops_per_byte={
        variant: {
          r['name']: {impl: cost['flops_per_byte'] for impl, cost in r['costs'].items()}
          for r in rows
        }
        for variant, rows in c['arithmetic_intensity'].items()
      },
      train_step_mib_per_image={
        k: r['mib_per_image'] for k, r in c['memory_per_device_batch'].items()
      },
      memory_growth_exponent=c['memory_growth']['exponent_train_step'],
      memory_growth_exponent_halo_attention=c['memory_growth']['exponent_halo_attention'],
      memory_growth_exponent_global_attention=c['memory_growth']['exponent_global_attention'],
    )
  if 'accelerator' in results:
    a = results['accelerator']
    figures.update(
      accelerator_images_per_s={k: r['images_per_s'] for k, r in a['steps'].items()},
      accelerator_mfu={k: r['mfu_vs_matmul_peak'] for k, r in a['steps'].items()},
      accelerator_h1_speedup_vs_timm=a.get('h1_speedup_vs_timm'),
      accelerator_h1_auto_speedup_vs_timm=a.get('h1_auto_speedup_vs_timm'),
      accelerator_attention_choice={
        variant: dict(measure.as_choice(records)) for variant, records in a['attention'].items()
      },
    )
  return figures


def main() -> None:
  on_cpu = jax.default_backend() == 'cpu'
  sections = [s for s in ARGS.sections.split(',') if s] or (
    ['cpu', 'costs'] if on_cpu else ['accelerator', 'costs']
  )
  unknown = set(sections) - {'cpu', 'costs', 'accelerator'}
  if unknown:
    sys.exit(f'--sections: unknown {sorted(unknown)}; choose from cpu, costs, accelerator')
  timm_or_reason = TIMM_OR_REASON
  if on_cpu and not isinstance(timm_or_reason, str):
    timm_or_reason[0].set_num_threads(ARGS.threads)  # The same threads as XLA's pool.
  batch = 2 if ARGS.tiny else ARGS.batch
  results = {
    'tiny': ARGS.tiny,
    'sections': sections,
    'machine': machine_info(timm_or_reason),
    'timm_skipped': timm_or_reason if isinstance(timm_or_reason, str) else None,
  }
  tables = []
  if 'cpu' in sections:
    print('cpu: matmul peak, train step, attention layers...', flush=True)
    peak = cpu.matmul_peak(256 if ARGS.tiny else 4096, ARGS.repeats + 2)
    results['cpu'] = {
      'matmul_peak_flops_per_s': peak,
      'train_step': cpu.train_step(timm_or_reason, batch, ARGS.tiny, ARGS.repeats),
      'attention': cpu.attention_layers(timm_or_reason, batch, ARGS.tiny, ARGS.repeats, peak),
    }
    tables.append(cpu.format_results(results['cpu']))
  if 'accelerator' in sections:
    batches = {'h1': 2} if ARGS.tiny else {'h1': ARGS.h1_batch, 'h7': ARGS.h7_batch}
    print("accelerator: each attention layer's forms...", flush=True)
    choices = accelerator.attention_choices(ARGS.tiny, batches)
    print('accelerator: train steps...', flush=True)
    results['accelerator'] = accelerator.train_steps(
      timm_or_reason, ARGS.tiny, ARGS.repeats, batches, choices
    )
    tables.append(accelerator.format_results(results['accelerator']))
  if 'costs' in sections:
    print(
      'costs (compile only): arithmetic intensity, memory per device batch, growth...', flush=True
    )
    results['costs'] = {
      'arithmetic_intensity': costs.arithmetic_intensity(ARGS.tiny),
      'memory_per_device_batch': costs.memory_per_device_batch(ARGS.tiny),
      'memory_growth': costs.memory_growth(ARGS.tiny),
    }
    tables.append(costs.format_results(results['costs']))
  results.update(headline(results))
  with open(ARGS.out, 'w') as f:
    json.dump(results, f, indent=2)
  print('\n\n'.join([''] + tables))
  print(f'\nwrote {ARGS.out}')


if __name__ == '__main__':
  main()
