"""XLA:CPU flags that make the tests' programs compile fast.

The tests' programs are tiny and mostly run a few times, so compiling is most of their time. XLA's
loop-fusion emitters and LLVM's optimisations cost more to compile than they save in running:
without them a tiny HaloNet train step compiles in under a quarter of the time (4.0 s to 0.9 s)
and runs about 2.7 times slower (28 to 75 ms). Runs that check a figure the README states (the
quick-starts) keep XLA's defaults.
"""

FAST_COMPILE = '--xla_cpu_use_fusion_emitters=false --xla_backend_optimization_level=0'

# For tests that read loops off a compiled CPU program: without its fusion emitters XLA:CPU writes
# some fusions as while loops of its own, which are not the program's (pass as `compiler_options`
# to `Lowered.compile`).
FUSION_EMITTERS = {'xla_cpu_use_fusion_emitters': True}

# For programs that run Pallas' GPU kernels in its interpreter (`attention_impl='pallas_gpu'` on
# CPU): the interpreter runs each kernel's grid as loops of small ops, which XLA:CPU's
# optimisations speed up about tenfold (an H1-like layer's gradients: 7 s to 0.4 s at 3 images),
# far more than they add to compiling a layer (0.8 s to 1.8 s). A whole train step's compile
# doubles (14 s to 27 s) for 1.5 s gained: steps keep FAST_COMPILE.
INTERPRETED_KERNELS = {'xla_backend_optimization_level': 3, 'xla_cpu_use_fusion_emitters': True}
