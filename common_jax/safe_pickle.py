"""Pickles of plain data (dicts, lists, sets, tuples, strings, bytes, numbers) read without running their code.

`pickle.loads` calls whatever global a file names: an object's `__reduce__` can name `os.system` with a command
as its argument. Files such as the benchmark annotations are downloaded from third-party repositories, so they
are read with an unpickler that resolves only the builtin containers and scalars and refuses every other global
by name, before anything from the file is called. None, True/False and the numbers and strings of every
protocol have opcodes of their own and need no global.
"""
from __future__ import annotations

import builtins
import io
import pickle

# Globals that plain data is pickled with: sets and frozensets are `set(list)` reductions before protocol 4,
# and any container may appear as a reduction in hand-written or older pickles.
ALLOWED = frozenset({'dict', 'list', 'set', 'frozenset', 'tuple', 'str', 'bytes', 'bytearray', 'int', 'float',
                     'complex', 'bool'})
_MODULES = ('builtins', '__builtin__')   # Python 3's name, and Python 2's (what protocols 0-2 write)


class UnsafePickleError(ValueError):
  """A pickle that names a global other than plain data; nothing in it has been called."""


class _Refused(pickle.UnpicklingError):
  pass


def _bytes_from_latin1(text, encoding):
  """What Python 3 writes for bytes under protocols 0-2 (`_codecs.encode(text, 'latin1')`), and nothing else."""
  if not isinstance(text, str) or encoding != 'latin1':
    raise _Refused(f'_codecs.encode with {type(text).__name__}, {encoding!r}')
  return text.encode('latin1')


class _PlainUnpickler(pickle.Unpickler):

  def find_class(self, module, name):
    if module in _MODULES and name in ALLOWED:
      return getattr(builtins, name)
    if (module, name) == ('_codecs', 'encode'):
      return _bytes_from_latin1
    raise _Refused(f'{module}.{name}')

  def persistent_load(self, pid):
    raise _Refused(f'persistent id {pid!r}')


def loads(data: bytes, where: str, what: str = 'this pickle'):
  """The object pickled in `data`. UnsafePickleError (naming `where` and the refused global) for anything other
  than plain data; a corrupt pickle raises what the unpickler raises."""
  try:
    return _PlainUnpickler(io.BytesIO(data)).load()
  except _Refused as e:
    raise UnsafePickleError(f"{where}: refuses to load '{e}' (only plain data is allowed in {what})") from None
