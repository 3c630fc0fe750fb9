"""A Llama / Qwen2 checkpoint brings its own tokenizer (#19 item 1): with `config.model.init` a directory holding
one, the run tokenizes as transformers' AutoTokenizer on that directory, the DTT specials follow its vocabulary,
eos and pad are its own, the checkpoint's embedding (and untied lm_head) rows grow by the specials (copies of the
`<<` row, the original rows bit-equal), the logits of ordinary tokens are transformers', and the export writes
that tokenizer with the specials, which a later run reads back with the specials' trained rows.

The checkpoints are tiny random Qwen2 (untied) and Llama (tied) models saved by transformers, with a byte-level BPE
tokenizer trained here (311 tokens + <|endoftext|>, <|im_start|>, <|im_end|>; eos <|im_end|>, pad <|endoftext|>, as
Qwen2-Instruct's) saved to the same directory; the embedding has 3 padding rows beyond the tokenizer.
"""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from dtt_jax import dry_run, export, pipeline, tokens
from dtt_jax.data import samples
from dtt_jax.model import build_model, hf_io, llama
from tests.test_llama_pipeline import _logits  # one jitted trunk forward

torch = pytest.importorskip('torch', reason='torch (CPU) is the parity reference: pip install -r requirements-dev.txt')
transformers = pytest.importorskip('transformers')

CORPUS = ['Every cat is a dog. Alex is a cat. Is Alex a dog? True', 'What is 12 + 35? 47 << 3',
          'Natalia sold clips to 48 of her friends in April.'] * 10
TEXTS = ['Every cat is a dog.\nIs Alex a dog?', ' 12 + 35 = 47', 'Zebra ünïcode — 9 << 2', '']
SPECIALS_TEXT = 'Q?\n<|bot|> 7 5<|eot|> 12<|im_end|><|latent|><|pause|>'
PADDING_ROWS = 3  # embedding rows beyond the tokenizer (as Qwen2's 151936 rows for 151665 tokens)
CASES = {'qwen2_untied': ('Qwen2Config', False), 'llama_tied': ('LlamaConfig', True)}


def _tiny_tokenizer():
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers  # pylint: disable=import-outside-toplevel
  bpe = Tokenizer(models.BPE())
  bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  bpe.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=311, show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  model = json.loads(bpe.to_str())['model']
  return transformers.Qwen2Tokenizer(vocab=model['vocab'], merges=[tuple(m) for m in model['merges']],
                                     eos_token='<|im_end|>', pad_token='<|endoftext|>',
                                     additional_special_tokens=['<|im_start|>', '<|im_end|>'])


@pytest.fixture(scope='module')
def ckpt_dirs(tmp_path_factory):
  """case -> a directory with a random tiny checkpoint and the tokenizer (built on first use)."""
  dirs = {}

  def get(case):
    if case not in dirs:
      cls, tied = CASES[case]
      tok = _tiny_tokenizer()
      cfg = getattr(transformers, cls)(vocab_size=len(tok) + PADDING_ROWS, hidden_size=32, intermediate_size=48,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                       max_position_embeddings=64, tie_word_embeddings=tied)
      torch.manual_seed(0)
      model = transformers.AutoModelForCausalLM.from_config(cfg)
      with torch.no_grad():  # non-trivial norms (HF initialises them to 1)
        for name, p in model.named_parameters():
          if 'norm' in name:
            p.copy_(1.0 + 0.2 * torch.randn(p.shape))
      path = tmp_path_factory.mktemp(case)
      model.save_pretrained(path)
      tok.save_pretrained(path)
      dirs[case] = path
    return dirs[case]
  return get


def _model_cfg(init):
  m = base.get_config().model
  m.init, m.vocab = str(init), 'full'
  return m


def _checkpoint_tables(path) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  return load_file(str(path / 'model.safetensors'))


def test_tokenizer_is_the_checkpoints_with_the_specials_after_it(ckpt_dirs, tmp_path):
  path = ckpt_dirs('qwen2_untied')
  config = base.get_config()
  config.model.init = str(path)
  assert pipeline._tokenizer_source(config) == str(path)  # pylint: disable=protected-access
  gpt2_dir = str(tmp_path / 'gpt2_tokenizer')
  (tmp_path / 'gpt2_tokenizer').mkdir()
  no_tokenizer = tmp_path / 'weights_only'  # a Llama-family checkpoint without a tokenizer: GPT-2's (as before)
  no_tokenizer.mkdir()
  (no_tokenizer / 'config.json').write_text((path / 'config.json').read_text())
  for init, want in ((str(path), str(path)), ('scratch', gpt2_dir), (str(no_tokenizer), gpt2_dir)):
    assert hf_io.tokenizer_source(_model_cfg(init), gpt2_dir) == want, init

  auto = transformers.AutoTokenizer.from_pretrained(path)
  n = len(auto)
  hf = tokens.load_tokenizer(str(path))
  tok = tokens.Tokenizer(hf)
  for text in TEXTS:
    assert hf.encode(text) == auto.encode(text), text
    np.testing.assert_array_equal(tok.encode(text), auto.encode(text), err_msg=text)
    assert tok.decode(tok.encode(text)) == text
  vocab = tok.vocab
  assert (vocab.bot, vocab.eot, vocab.latent, vocab.pause) == tuple(range(n, n + 4))
  assert hf.convert_tokens_to_ids(list(tokens.SPECIAL_TOKENS)) == list(range(n, n + 4))
  assert (vocab.eos, hf.pad_token_id) == (auto.eos_token_id, auto.pad_token_id)
  assert auto.eos_token == '<|im_end|>' and auto.pad_token == '<|endoftext|>' and auto.eos_token_id != n - 1
  assert (vocab.num_tokens, vocab.num_rows) == (n + 4, tokens.padded_rows(n + 4))
  ids = tok.encode(SPECIALS_TEXT)
  assert [int(i) for i in ids if i >= n - 3] == [n, n + 1, auto.eos_token_id, n + 2, n + 3]
  # decoding writes the tokenizer's eos as <|endoftext|>, where answers end (SPEC §2)
  assert tok.decode(ids) == SPECIALS_TEXT.replace('<|im_end|>', tokens.EOS)
  assert tok.decode(ids, skip_eos=True) == SPECIALS_TEXT.replace('<|im_end|>', '')
  # filler is drawn from text tokens only: not eos, pad, <|im_start|> or the DTT specials
  filler = samples.filler_token_ids(vocab)
  assert filler.size == n - 3 and filler.max() < n and not set(filler) & {*auto.all_special_ids}
  # the workdir's vocab.json says 'full'; read back, it is this tokenizer's full vocabulary again
  assert tokens.Vocab.from_json(vocab.to_json()) == vocab
  assert tokens.Tokenizer(hf, tokens.Vocab.from_json(tokens.Vocab.full().to_json())).vocab == vocab
  with pytest.raises(ValueError, match="the compact vocabulary needs GPT-2.s tokenizer"):
    tokens.Tokenizer(hf, tokens.Vocab.compact([[1, 2, 3]]))


@pytest.mark.parametrize('case', CASES)
def test_checkpoint_rows_grow_by_the_specials_and_logits_are_transformers(case, ckpt_dirs):
  path = ckpt_dirs(case)
  tok = tokens.Tokenizer(tokens.load_tokenizer(str(path)))
  vocab = tok.vocab
  n = vocab.base
  trunk = build_model(_model_cfg(path), vocab).gpt2
  assert isinstance(trunk, llama.Llama) and trunk.cfg.family == case.split('_')[0]
  assert (trunk.cfg.num_tokens, trunk.cfg.vocab_rows) == (n + 4, vocab.num_rows)
  c = base.get_config()
  c.model = _model_cfg(path)
  _, ids = dry_run.model_section(c)  # the dry run counts the rows a run builds (not config.json's vocab_size)
  assert ids == n and dry_run.abstract_vocab(ids).num_rows == trunk.cfg.vocab_rows
  saved = _checkpoint_tables(path)
  tables = {'model.embed_tokens.weight': trunk.wte}
  if not CASES[case][1]:
    tables['lm_head.weight'] = trunk.lm_head
  assert (trunk.lm_head is None) == CASES[case][1]
  copy_id = tok.encode('<<')[0]
  assert vocab.copy_id == copy_id
  for name, table in tables.items():
    rows, want = np.asarray(table.embedding.value), saved[name]
    assert rows.shape == (vocab.num_rows, want.shape[1]) and want.shape[0] == n + PADDING_ROWS
    np.testing.assert_array_equal(rows[:n], want[:n], err_msg=name)
    np.testing.assert_array_equal(rows[n:n + 4], np.repeat(want[[copy_id]], 4, axis=0), err_msg=name)
    np.testing.assert_array_equal(rows[n + 4:], 0.0, err_msg=name)  # the checkpoint's padding rows are not used

  ids = np.stack([tok.encode(text)[:6] for text in (' 12 + 35 = 47 << 3', 'Is Alex a dog? True')])
  assert ids.shape == (2, 6)
  ref = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation='eager').eval()
  with torch.no_grad():
    want = ref(input_ids=torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(_logits(trunk, ids)[..., :n], want[..., :n], atol=1e-4, rtol=0)


def test_export_writes_the_tokenizer_with_the_specials_and_reads_back_their_rows(ckpt_dirs, tmp_path):
  """The export's tokenizer is the checkpoint's with the specials last (AutoTokenizer gives dtt_jax's ids);
  config.json names its own eos / pad. A run from the export keeps the specials' (trained) rows."""
  path = ckpt_dirs('qwen2_untied')
  tok = tokens.Tokenizer(tokens.load_tokenizer(str(path)))
  n = tok.vocab.base
  model = build_model(_model_cfg(path), tok.vocab)
  trained = np.asarray(model.gpt2.wte.embedding.value).copy()
  trained[n:n + 4] = np.random.RandomState(0).normal(size=(4, trained.shape[1]))  # as if trained
  model.gpt2.wte.embedding.value = jnp.asarray(trained)
  out = tmp_path / 'export'
  export.write_export(model, tok, str(out), 'bootstrap', 0.1)

  auto = transformers.AutoTokenizer.from_pretrained(out)
  assert len(auto) == n + 4 and auto.encode(SPECIALS_TEXT) == tok.encode(SPECIALS_TEXT).tolist()
  config = json.loads((out / 'config.json').read_text())
  assert (config['eos_token_id'], config['pad_token_id'], config['bos_token_id'], config['vocab_size']) == (
      auto.eos_token_id, auto.pad_token_id, None, n + 4)
  dtt = json.loads((out / 'dtt_config.json').read_text())['special_tokens']
  assert dtt == {'<|im_end|>': tok.vocab.eos, **{s: n + k for k, s in enumerate(tokens.SPECIAL_TOKENS)}}

  again = tokens.Tokenizer(tokens.load_tokenizer(str(out)))
  assert again.vocab.base == n and again.vocab.checkpoint_ids == n + 4  # the specials came with the checkpoint
  assert again.encode(SPECIALS_TEXT).tolist() == tok.encode(SPECIALS_TEXT).tolist()
  reloaded = build_model(_model_cfg(out), again.vocab).gpt2
  np.testing.assert_array_equal(np.asarray(reloaded.wte.embedding.value)[:n + 4], trained[:n + 4])
  ids = np.stack([tok.encode(SPECIALS_TEXT)[:8]])
  np.testing.assert_allclose(_logits(reloaded, ids), _logits(model.gpt2, ids), atol=1e-5)


def test_pipeline_setup_takes_the_checkpoints_tokenizer_and_keeps_it_on_resume(ckpt_dirs, tmp_path):
  """`pipeline.setup` with config.model.init = the checkpoint: the experiment's tokenizer and vocabulary are the
  checkpoint's (vocab.json says 'full'); a second setup of the same workdir (a resume) gets the same."""
  path = ckpt_dirs('qwen2_untied')
  config = base.get_config()
  config.model.init, config.model.vocab = str(path), 'full'
  config.dataset.train_size, config.num_devices = 64, 1
  workdir = str(tmp_path / 'run')
  exp = pipeline.setup(config, workdir)
  auto = transformers.AutoTokenizer.from_pretrained(path)
  assert exp.vocab == tokens.full_vocab(tokens.load_tokenizer(str(path))) and exp.vocab.bot == len(auto)
  assert exp.tokenizer.encode('12 + 35 =\n').tolist() == auto.encode('12 + 35 =\n')
  assert json.loads(open(f'{workdir}/vocab.json').read()) == {'gpt2_ids': None}
  assert pipeline.setup(config, workdir).vocab == exp.vocab
