"""Compile the Pallas GPU (Triton) kernels for NVIDIA GPUs on a machine without one.

    python bench/gpu_aot.py                     # H1 and H7 layers: bench/results_gpu_aot.json
    python bench/gpu_aot.py --tiny --out /tmp/g.json   # two layers of H1: a smoke test

Each distinct attention layer's forward + backward (bfloat16, --batch images) is lowered for CUDA
(`jax.export`, no GPU needed); its three Triton kernels are taken from the lowered module, and
Triton (the `triton` package torch installs) compiles each for every --targets architecture to
PTX, which `ptxas -v` assembles: registers per thread, spills and the shared memory it needs,
what decides how many programs a streaming multiprocessor runs at once. Nothing runs; times
need a GPU (bench/run.py, 'auto' itself).
"""

import argparse
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench import common  # noqa: E402
from halonet import attention  # noqa: E402

KERNEL_CALL = '__gpu$xla.gpu.triton'
# Architecture -> (Triton's capability, ptxas's -arch): Hopper (H100/H200), Ampere (A100).
TARGETS = {'sm_90a': (90, 'sm_90a'), 'sm_80': (80, 'sm_80')}
_PTXAS = re.compile(
  r'(?P<stack>\d+) bytes stack frame, (?P<spill_stores>\d+) bytes spill stores, '
  r'(?P<spill_loads>\d+) bytes spill loads.*?Used (?P<registers>\d+) registers',
  re.S,
)


def lowered_layer(layer: dict[str, Any], batch: int) -> str:
  """The layer's forward + backward in the 'pallas_gpu' form, lowered for CUDA."""
  fields = {
    k: layer[k]
    for k in ('qk_width', 'value_width', 'num_heads', 'block_size', 'halo_size', 'stride')
  }
  net = attention.HaloAttention(
    **fields, attention=attention.AttentionPlan('pallas_gpu'), dtype=jnp.bfloat16
  )
  x = jax.ShapeDtypeStruct((batch, *layer['input']), jnp.bfloat16)
  params = jax.eval_shape(net.init, jax.random.key(1), x)
  loss = lambda p, x: net.apply(p, x).astype(jnp.float32).sum()
  exported = jax.export.export(
    jax.jit(jax.grad(loss, argnums=(0, 1))),
    platforms=('cuda',),
    disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(KERNEL_CALL)],
  )(params, x)
  return exported.mlir_module()


def _unescape(text: str) -> bytes:
  """An MLIR string attribute's printed form (\\XX hex escapes) back to its bytes."""
  out, i = bytearray(), 0
  while i < len(text):
    if text[i] != '\\':
      out.extend(text[i].encode())
      i += 1
    elif text[i + 1] in '\\"':
      out.append(ord(text[i + 1]))
      i += 2
    else:
      out.append(int(text[i + 1 : i + 3], 16))
      i += 3
  return bytes(out)


def kernels(module: str) -> dict[str, tuple[bytes, dict[str, int]]]:
  """Each Triton kernel of a lowered module: name -> (its Triton IR as MLIR bytecode, its
  num_warps and num_stages)."""
  calls = re.findall(
    r'ir = "((?:[^"\\]|\\.)*)", name = "(\w+)", num_stages = (\d+) : i32, num_warps = (\d+)',
    module,
  )
  return {
    name: (_unescape(ir), {'num_warps': int(warps), 'num_stages': int(stages)})
    for ir, name, stages, warps in calls
  }


def _ptxas() -> str:
  """CUDA's assembler: on PATH, else the one Triton ships."""
  from triton import knobs  # pylint: disable=import-outside-toplevel

  return shutil.which('ptxas') or knobs.nvidia.ptxas.path


def compile_kernel(
  ir: bytes, options: dict[str, int], name: str, target: str, scratch: pathlib.Path
) -> dict[str, int]:
  """Registers, spills and shared memory of one kernel compiled for `target`."""
  import triton  # pylint: disable=import-outside-toplevel
  from triton._C.libtriton import ir as triton_ir  # pylint: disable=import-outside-toplevel
  from triton.backends.compiler import GPUTarget  # pylint: disable=import-outside-toplevel
  from triton.backends.nvidia.compiler import CUDABackend  # pylint: disable=import-outside-toplevel

  capability, arch = TARGETS[target]
  gpu = GPUTarget('cuda', capability, 32)
  context = triton_ir.context()
  triton_ir.load_dialects(context)
  CUDABackend(gpu).load_dialects(context)
  (scratch / f'{name}.mlirbc').write_bytes(ir)
  source = scratch / f'{name}.ttir'  # Triton compiles IR from a text file.
  source.write_text(str(triton_ir.parse_mlir_module(str(scratch / f'{name}.mlirbc'), context)))
  compiled = triton.compile(str(source), target=gpu, options=options)
  ptx = scratch / f'{name}.ptx'
  ptx.write_text(compiled.asm['ptx'])
  report = subprocess.run(
    [_ptxas(), f'-arch={arch}', '-v', str(ptx), '-o', str(scratch / f'{name}.cubin')],
    capture_output=True,
    text=True,
    check=True,
  ).stderr
  figures = {k: int(v) for k, v in _PTXAS.search(report).groupdict().items()}
  return {**figures, **options, 'shared_bytes': int(compiled.metadata.shared)}


def main() -> None:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument('--variants', default='h1,h7', help='comma-separated paper variants')
  parser.add_argument('--tiny', action='store_true', help="H1's first two layers: a smoke test")
  parser.add_argument('--batch', type=int, default=8, help='images per layer call')
  parser.add_argument('--targets', default=','.join(TARGETS), help=f'of {list(TARGETS)}')
  parser.add_argument(
    '--out', default=os.path.join(os.path.dirname(__file__), 'results_gpu_aot.json')
  )
  args = parser.parse_args()
  targets = args.targets.split(',')
  for target in targets:
    if target not in TARGETS:
      parser.error(f'--targets: {target!r} is not one of {list(TARGETS)}')
  variants = ['h1'] if args.tiny else args.variants.split(',')
  results = {'batch': args.batch, 'layers': []}
  with tempfile.TemporaryDirectory() as scratch:
    for variant in variants:
      layers = common.attention_layer_shapes(common.variant_config(variant), tiny=args.tiny)
      for layer in layers:
        found = kernels(lowered_layer(layer, args.batch))
        row = {'variant': variant, **layer, 'kernels': {}}
        for name, (ir, options) in found.items():
          row['kernels'][name] = {
            t: compile_kernel(ir, options, name, t, pathlib.Path(scratch)) for t in targets
          }
          for target, figures in row['kernels'][name].items():
            print(
              f'{variant} {layer["name"]:>10} {"x".join(map(str, layer["input"])):>11} '
              f'b{layer["block_size"]} h{layer["halo_size"]} s{layer["stride"]} '
              f'{name.removeprefix("halo_attention_gpu_"):>16} {target}: '
              f'{figures["registers"]:3d} registers, {figures["spill_stores"]} B spilled, '
              f'{figures["shared_bytes"] / 1024:.1f} KiB shared, {figures["num_warps"]} warps',
              flush=True,
            )
        results['layers'].append(row)
  pathlib.Path(args.out).write_text(json.dumps(results, indent=1) + '\n')
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
