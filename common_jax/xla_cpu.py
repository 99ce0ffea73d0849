"""XLA:CPU compiler options for the backbones and train steps, set once, before JAX starts its CPU backend.

XLA reads XLA_FLAGS when the first backend is created, so these options are process-wide: a command calls
`configure(name)` first thing, with the option set that suits the models it will run. Options the user already
put in XLA_FLAGS win (the same flag is never added twice), so any choice here can be overridden from the shell.

Option sets (measured side by side with the PyTorch modules by `bench/backbones.py --xla_options=...` and
`bench/avhash.py --xla_options=...`; figures in docs/performance.md):
  * 'xla_default': XLA's own choice, which hands every dot and convolution to YNNPACK.
  * 'no_ynn': dots and convolutions through XLA's own emitters (Eigen / XNNPACK kernels) instead of YNNPACK.
  * 'onednn': as 'no_ynn', with oneDNN thunks for the matmuls and convolutions.
  * 'fast_compile': LLVM at -O1 for XLA's own fused loops (dots and convolutions are library kernels either
    way): the HAP-VR evaluation engine compiles about an eighth faster at the same speed
    (bench/hapvr_eval.py, bench/first_results.py).
None of them changes float32 arithmetic beyond summation order (no fast-math); tests/backbones/xla_options_test
checks each against the PyTorch references.
"""
from __future__ import annotations

import os
from typing import Iterable, MutableMapping, Sequence

NO_YNN = '--xla_cpu_experimental_ynn_fusion_type='
OPTION_SETS = {
    'xla_default': (),
    'no_ynn': (NO_YNN,),
    'onednn': (NO_YNN, '--xla_cpu_use_onednn=true'),
    'fast_compile': ('--xla_backend_optimization_level=1',),
}
# The set a program running these models starts with (chosen from same-run benchmarks; oneDNN led no_ynn on
# every backbone by a few %, both 1.1-1.4x XLA's default).
RECOMMENDED = {
    'resnet50_irmac': 'onednn',
    'dino_vits16': 'onednn',
    'clip_vitl14': 'onednn',
    'ast': 'onednn',
    'avhash_train': 'xla_default',   # not yet measured apart from noise: bench/avhash.py --xla_options
    'hapvr_engine': 'fast_compile',
}


def flag_name(flag: str) -> str:
  """'--xla_cpu_use_onednn=true' -> 'xla_cpu_use_onednn'."""
  return flag.lstrip('-').split('=', 1)[0]


def merged(user_flags: str, options: Iterable[str]) -> str:
  """`user_flags` (an XLA_FLAGS value) plus `options`, leaving out each option whose flag the user already set."""
  have = {flag_name(f) for f in user_flags.split()}
  extra = [o for o in options if flag_name(o) not in have]
  return ' '.join(f for f in (user_flags.strip(), *extra) if f)


def options_for(names: Sequence[str]) -> tuple:
  """The flags of a set name ('no_ynn') or the recommended set of a model ('resnet50_irmac'); several names: the
  set they all share (models recommending different sets in one process get XLA's defaults)."""
  sets = []
  for name in names:
    name = RECOMMENDED.get(name, name)
    if name not in OPTION_SETS:
      raise ValueError(f'unknown XLA:CPU option set {name!r}; known: {", ".join(OPTION_SETS)} or a model: '
                       f'{", ".join(RECOMMENDED)}')
    sets.append(name)
  return OPTION_SETS[sets[0]] if sets and len(set(sets)) == 1 else ()


def backend_started() -> bool:
  """Whether JAX has created its backends (after which XLA_FLAGS are no longer read)."""
  try:
    from jax._src import xla_bridge
    return bool(xla_bridge.backends_are_initialized())
  except (ImportError, AttributeError):   # a JAX without this probe: assume not started
    return False


ENV = 'JAX_VR_XLA_CPU'   # an option set name here replaces every command's choice (xla_default: XLA's own)


def configure(*names: str, environ: MutableMapping[str, str] = os.environ) -> bool:
  """Adds the option set of `names` (see `options_for`), or the set named by the JAX_VR_XLA_CPU variable, to
  XLA_FLAGS in `environ`. False, with nothing changed, when JAX's backend has already started (the options would
  not apply: call this before any computation)."""
  options = options_for([environ[ENV]] if environ.get(ENV) else names)
  if backend_started():
    return False
  environ['XLA_FLAGS'] = merged(environ.get('XLA_FLAGS', ''), options)
  return True
