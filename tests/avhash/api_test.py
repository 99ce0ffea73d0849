"""avhash_jax.api: codes of video files equal the index's, and the Index interface (add, remove, search, ids)
works on video files, ids and codes, on a directory the CLI built and on a new one."""
import numpy as np
import pytest

from avhash_jax import api
from avhash_jax import index as index_lib
from common_jax import hamming
from common_jax.index_dir import IndexDir


@pytest.fixture(scope='module')
def model(av_videos):
  return api.load(av_videos['ckpt'], clip=av_videos['clip'], ast=av_videos['ast'], workers=2)


def test_code_of_a_video_is_the_one_the_cli_indexed(model, av_videos):
  paths = av_videos['paths']
  codes = model.codes([paths['tone'], paths['long']])
  assert codes.shape == (2, 16) and codes.dtype == np.int8 and set(np.unique(codes)) <= {-1, 1}
  np.testing.assert_array_equal(model.code(paths['tone']), codes[0])
  ix = IndexDir.open(av_videos['index'])
  np.testing.assert_array_equal(hamming.pack(codes), np.stack([ix.read(v, 'code') for v in ('tone', 'long')]))
  assert model.distance(paths['tone'], paths['tone']) == 0


def test_index_add_search_remove(model, av_videos, tmp_path):
  paths = av_videos['paths']
  ix = api.Index(str(tmp_path / 'idx'), model)
  assert ix.add([paths['tone'], paths['silent']]) == 2
  assert ix.add({'long': paths['long'], 'tone': paths['tone']}) == 1     # tone is there already
  assert ix.ids() == ['long', 'silent', 'tone'] and len(ix) == 3 and 'long' in ix
  hits = ix.search(paths['silent'], top_k=3)
  assert len(hits) == 3 and {'rank', 'id', 'path', 'distance', 'score'} <= set(hits[0])
  assert next(h for h in hits if h['id'] == 'silent')['distance'] == 0
  by_id = ix.search('silent', top_k=5)
  assert [h['id'] for h in by_id] == [h['id'] for h in hits if h['id'] != 'silent']
  assert ix.search(model.code(paths['silent']), top_k=3) == hits
  assert ix.remove(['silent']) == 1 and ix.ids() == ['long', 'tone']
  assert 'silent' not in [h['id'] for h in ix.search(paths['silent'], top_k=3)]
  with pytest.raises(ValueError, match='broken.mp4'):
    ix.add([paths['broken']])
  reader = api.Index(av_videos['index'])                               # the CLI's index, without a model
  assert [h['id'] for h in reader.search('tone', top_k=2)] == [h['id'] for h in
                                                             api.Index(av_videos['index'], model).search('tone', 2)]
  with pytest.raises(ValueError, match='needs a model'):
    reader.search(paths['tone'])
  assert index_lib.KIND == IndexDir.open(str(tmp_path / 'idx')).kind
