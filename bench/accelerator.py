"""On a GPU or TPU: what 'auto' finds for each H1 and H7 attention layer, and images/s and
model-FLOP utilisation (MFU) of the H1 and H7 train steps in bfloat16 with the plain form and with
the forms 'auto' chose, next to timm's halonet_h1 under torch autocast bfloat16 on the same GPU.

The attention: each distinct layer at the train step's per-device batch, forward + backward, with
every form measure.py tries on this backend (measured afresh: the cache is neither read nor
written), checked against plain; the fastest correct one is the choice.

MFU counts model FLOPs only: 3x the forward FLOPs of XLA's cost analysis of the loop-free model
(forward, and backward at twice the forward), so remat's recomputation is not credited. It is
given against the chip's nominal dense bfloat16 peak (when the device is in the table) and
against the measured rate of one large bfloat16 matmul in the same run. timm's MFU uses the same
FLOP count: halonet_h1 is the same network.
"""

from typing import Any

import jax

from bench import common
from bench import cpu
from halonet.attention import measure
from halonet.models import networks
from halonet.tools import variants as summary

# Dense bfloat16 matmul peaks from the vendors' data sheets (no sparsity), FLOP/s, matched as
# substrings of jax's device_kind. H100/H200: the SXM parts.
NOMINAL_BF16_FLOPS = (
  ('H100', 989e12),
  ('H200', 989e12),
  ('A100', 312e12),
  ('L4', 121e12),
  ('TPU v4', 275e12),
  ('TPU v5 lite', 197e12),
  ('TPU v5p', 459e12),
  ('TPU v6 lite', 918e12),
)
DEFAULT_BATCHES = {'h1': 64, 'h7': 16}  # Per device; H7 at 600 px trains with remat.


def nominal_peak(device_kind: str) -> float | None:
  return next((flops for name, flops in NOMINAL_BF16_FLOPS if name in device_kind), None)


def step_config(variant: str, tiny: bool, attention_impl: str = 'plain'):
  """The variant as a TPU/GPU user runs it: bfloat16, remat for H7."""
  return common.variant_config(
    variant,
    tiny=tiny,
    **{
      'model.dtype': 'bfloat16',
      'model.attention_impl': attention_impl,
      'model.remat': variant == 'h7',
    },
  )


def attention_choices(tiny: bool, batches: dict[str, int]) -> dict[str, dict[str, Any]]:
  """{variant: {layer key: measure.measure_layer's record}} on this device, one line per layer."""
  candidates = measure.CANDIDATES[jax.default_backend()]
  choices = {}
  for variant, batch in batches.items():
    config = step_config(variant, tiny, attention_impl='auto')
    model = networks.create_model(config)
    choices[variant] = {}
    for layer in measure.model_layers(model, config.image_size, batch):
      record = measure.measure_layer(layer, candidates)
      choices[variant][layer.key()] = {**record, 'layer': layer.as_json()}
      times = ', '.join(f'{impl} {s * 1e3:.3g} ms' for impl, s in record['seconds'].items())
      skipped = ''.join(f'; {impl} skipped: {why}' for impl, why in record['skipped'].items())
      print(f'  {variant} {layer.key()}: {times}{skipped} -> {record["choice"]}', flush=True)
  return choices


def timm_train_step(torch, timm, batch: int, image_size: int):
  """timm's halonet_h1 train step on the GPU under autocast bfloat16, channels-last."""
  net = timm.create_model('halonet_h1', num_classes=1000).cuda().train()
  net = net.to(memory_format=torch.channels_last)
  opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True)
  images = torch.zeros(batch, 3, image_size, image_size, device='cuda')
  images = images.to(memory_format=torch.channels_last)
  labels = torch.zeros(batch, dtype=torch.long, device='cuda')

  def run():
    opt.zero_grad(set_to_none=True)
    with torch.autocast('cuda', dtype=torch.bfloat16):
      loss = torch.nn.functional.cross_entropy(net(images), labels)
    loss.backward()
    opt.step()
    torch.cuda.synchronize()

  return run


def train_steps(
  timm_or_reason,
  tiny: bool,
  repeats: int,
  batches: dict[str, int],
  choices: dict[str, dict[str, Any]],
) -> dict[str, Any]:
  """Timed bfloat16 train steps of H1 and H7 (and timm's H1 on CUDA), with MFU: `ours_VARIANT`
  with the plain form, `ours_VARIANT_auto` with each layer's form from `choices`."""
  device_kind = jax.devices()[0].device_kind
  peak = cpu.matmul_peak(256 if tiny else 8192, repeats)['bfloat16']
  nominal = nominal_peak(device_kind)
  fns, model_flops, image_size = {}, {}, {}
  for variant, batch in batches.items():
    config = step_config(variant, tiny)
    fns[f'ours_{variant}'] = common.timed_train_step(config, batch)
    model_flops[f'ours_{variant}'] = 3 * summary.gflops_per_image(config) * 1e9 * batch
    chosen = measure.as_choice(choices[variant])
    auto = step_config(variant, tiny, attention_impl='auto')
    fns[f'ours_{variant}_auto'] = common.timed_train_step(auto, batch, chosen)
    model_flops[f'ours_{variant}_auto'] = model_flops[f'ours_{variant}']
    image_size[variant] = config.image_size
  timm_skipped = None
  if isinstance(timm_or_reason, str):
    timm_skipped = timm_or_reason
  elif not timm_or_reason[0].cuda.is_available():
    timm_skipped = 'timm is timed on CUDA only'
  elif tiny or 'h1' not in batches:
    timm_skipped = 'tiny: timm halonet_h1 needs 256 px'
  else:
    torch, timm = timm_or_reason
    fns['timm_h1'] = timm_train_step(torch, timm, batches['h1'], image_size['h1'])
    model_flops['timm_h1'] = model_flops['ours_h1']
  seconds = common.seconds_of(common.best_of(fns, repeats))
  rows = {}
  for name, s in seconds.items():
    variant = name.split('_')[1]
    rows[name] = {
      'batch': batches[variant],
      'image_size': image_size[variant],
      'seconds': s,
      'images_per_s': batches[variant] / s,
      'mfu_vs_matmul_peak': model_flops[name] / s / peak,
      'mfu_vs_nominal_peak': model_flops[name] / s / nominal if nominal else None,
    }
  result = {
    'device': device_kind,
    'backend': jax.default_backend(),
    'matmul_peak_bf16_flops_per_s': peak,
    'nominal_peak_bf16_flops_per_s': nominal,
    'attention': choices,
    'steps': rows,
    'timm_skipped': timm_skipped,
  }
  if 'timm_h1' in seconds:
    result['h1_speedup_vs_timm'] = seconds['timm_h1'] / seconds['ours_h1']
    result['h1_auto_speedup_vs_timm'] = seconds['timm_h1'] / seconds['ours_h1_auto']
  return result


def format_results(result: dict[str, Any]) -> str:
  """The accelerator section as a text table."""
  nominal = result['nominal_peak_bf16_flops_per_s']
  nominal = f'{nominal / 1e12:.0f} TFLOP/s' if nominal else 'unknown'
  lines = [
    f'Train steps on {result["device"]} ({result["backend"]}), bfloat16; matmul peak '
    f'{result["matmul_peak_bf16_flops_per_s"] / 1e12:.3g} TFLOP/s measured, {nominal} '
    f'nominal',
    f'  {"":10s} {"batch":>5s} {"px":>4s} {"images/s":>9s} {"MFU/matmul":>10s} '
    f'{"MFU/nominal":>11s}',
  ]
  for name, r in result['steps'].items():
    nominal_mfu = f'{r["mfu_vs_nominal_peak"]:11.1%}' if r['mfu_vs_nominal_peak'] else f'{"-":>11s}'
    lines.append(
      f'  {name:10s} {r["batch"]:5d} {r["image_size"]:4d} {r["images_per_s"]:9.1f} '
      f'{r["mfu_vs_matmul_peak"]:10.1%} {nominal_mfu}'
    )
  if result['timm_skipped']:
    lines.append(f'  timm skipped: {result["timm_skipped"]}')
  else:
    lines.append(
      f'  H1 speedup vs timm: {result["h1_speedup_vs_timm"]:.2f}x plain, '
      f'{result["h1_auto_speedup_vs_timm"]:.2f}x auto'
    )
  return '\n'.join(lines)
