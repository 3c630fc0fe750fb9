"""The Flax GPT-2 reproduces HF PyTorch GPT-2 logits, and checkpoints round-trip through HF's format."""

import json

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from dtt_jax import tokens
from dtt_jax.model import hf_io
from dtt_jax.model.gpt2 import causal_bias, positions_from_mask

torch = pytest.importorskip('torch', reason='torch (CPU) is the parity reference: pip install -r requirements-dev.txt')
transformers = pytest.importorskip('transformers')

VOCAB = 50257


@pytest.fixture(scope='module')
def hf_dir(tmp_path_factory):
  """A random tiny GPT2LMHeadModel saved with save_pretrained (safetensors)."""
  torch.manual_seed(0)
  cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4)
  model = transformers.GPT2LMHeadModel(cfg).eval()
  path = tmp_path_factory.mktemp('hf_tiny')
  model.save_pretrained(path)
  return path


def _batch():
  """Left-padded batch: rows with 0, 3 and 7 padding positions."""
  ids = np.random.RandomState(0).randint(0, VOCAB, (3, 12))
  mask = np.ones_like(ids)
  mask[1, :3] = 0
  mask[2, :7] = 0
  ids[mask == 0] = tokens.EOS_ID
  return ids, mask


def _torch_logits(model, ids, mask):
  pos = np.maximum(mask.cumsum(-1) - 1, 0)
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos))
  return out.logits.float().numpy()


def _jax_logits(model, ids, mask):
  ids, mask = jnp.asarray(ids), jnp.asarray(mask)
  hidden, _ = model(model.embed(ids), positions_from_mask(mask), causal_bias(mask))
  return np.asarray(model.logits(hidden))


def _max_diff(a, b, mask):
  return float(np.abs(a[..., :VOCAB] - b[..., :VOCAB])[mask > 0].max())


def test_logits_match_torch_with_left_padding(hf_dir):
  ref_model = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
  model = hf_io.load_pretrained(str(hf_dir))
  ids, mask = _batch()
  diff = _max_diff(_jax_logits(model, ids, mask), _torch_logits(ref_model, ids, mask), mask)
  print(f'max |logit diff| vs HF PyTorch: {diff:.2e}')
  assert diff < 1e-4


def test_padded_rows_are_masked(hf_dir):
  model = hf_io.load_pretrained(str(hf_dir))
  assert model.cfg.vocab_rows == 50304 and model.cfg.num_tokens == VOCAB
  logits = _jax_logits(model, *_batch())
  assert (logits[..., VOCAB:] < -1e8).all()


def test_pytorch_bin_checkpoint_loads(hf_dir, tmp_path):
  ref_model = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
  (tmp_path / 'config.json').write_text((hf_dir / 'config.json').read_text())
  state = {k: v for k, v in ref_model.state_dict().items() if k != 'lm_head.weight'}
  torch.save(state, tmp_path / 'pytorch_model.bin')
  (tmp_path / 'model.safetensors').unlink(missing_ok=True)
  model = hf_io.load_pretrained(str(tmp_path))
  ids, mask = _batch()
  assert _max_diff(_jax_logits(model, ids, mask), _torch_logits(ref_model, ids, mask), mask) < 1e-4


def test_export_then_hf_load_gives_same_logits(hf_dir, tmp_path):
  model = hf_io.load_pretrained(str(hf_dir))
  hf_io.export_pretrained(model, str(tmp_path))
  reloaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
  ids, mask = _batch()
  assert _max_diff(_jax_logits(model, ids, mask), _torch_logits(reloaded, ids, mask), mask) < 1e-4


def test_dtt_vocab_grows_embedding_from_copy_row(hf_dir):
  base = hf_io.load_pretrained(str(hf_dir))
  model = hf_io.load_pretrained(str(hf_dir), vocab=tokens.Vocab.full())
  emb, base_emb = np.asarray(model.wte.embedding.value), np.asarray(base.wte.embedding.value)
  assert emb.shape[0] == 50304 and model.cfg.num_tokens == tokens.GPT2_VOCAB
  np.testing.assert_array_equal(emb[:VOCAB], base_emb[:VOCAB])
  for special in (tokens.BOT_ID, tokens.EOT_ID, tokens.LATENT_ID, tokens.PAUSE_ID):
    np.testing.assert_array_equal(emb[special], base_emb[tokens.COPY_EMBEDDING_FROM_ID])
  np.testing.assert_array_equal(emb[tokens.GPT2_VOCAB:], 0.0)


def test_compact_vocab_selects_rows(hf_dir):
  base = hf_io.load_pretrained(str(hf_dir))
  vocab = tokens.Vocab.compact([[15496, 995, 0]])
  model = hf_io.load_pretrained(str(hf_dir), vocab=vocab)
  emb, base_emb = np.asarray(model.wte.embedding.value), np.asarray(base.wte.embedding.value)
  chex.assert_shape(emb, (128, 32))
  np.testing.assert_array_equal(emb[vocab.model_id(995)], base_emb[995])
  np.testing.assert_array_equal(emb[vocab.bot], base_emb[tokens.COPY_EMBEDDING_FROM_ID])


def test_missing_tensor_is_named(hf_dir, tmp_path):
  from safetensors.numpy import load_file, save_file
  tensors = load_file(hf_dir / 'model.safetensors')
  del tensors['transformer.h.1.mlp.c_fc.weight']
  save_file(tensors, tmp_path / 'model.safetensors')
  (tmp_path / 'config.json').write_text((hf_dir / 'config.json').read_text())
  with pytest.raises(KeyError, match=r'transformer\.h\.1\.mlp\.c_fc\.weight is missing'):
    hf_io.load_pretrained(str(tmp_path))


def test_unknown_architecture_is_rejected(hf_dir, tmp_path):
  cfg = json.loads((hf_dir / 'config.json').read_text())
  cfg.update(model_type='llama', architectures=['LlamaForCausalLM'])
  (tmp_path / 'config.json').write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match="model_type='llama'.*only GPT-2"):
    hf_io.load_pretrained(str(tmp_path))


def test_missing_directory_names_path():
  with pytest.raises(OSError, match='not a local directory'):
    hf_io.load_pretrained('/nonexistent/dir/for/test')
