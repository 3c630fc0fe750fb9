"""GPT-2 tokenizer with the DTT special tokens, and the model vocabulary.

GPT-2 ids are what users see (tokenizer output, datasets, completions). Model ids index the model's embedding
rows. With the full vocabulary they are the same; with the compact vocabulary (SPEC §2) model ids are a dense
remapping of the GPT-2 ids that occur in the training data plus the specials, which makes tiny CPU models 10-50x
cheaper. `Vocab` maps between the two and is saved with every checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Sequence

import numpy as np

EOS = '<|endoftext|>'
BOT = '<|bot|>'
EOT = '<|eot|>'
LATENT = '<|latent|>'
PAUSE = '<|pause|>'
SPECIAL_TOKENS = (BOT, EOT, LATENT, PAUSE)

# Fixed GPT-2 ids (SPEC §2). Pad is <|endoftext|> with an attention mask.
EOS_ID = 50256
BOT_ID = 50257
EOT_ID = 50258
LATENT_ID = 50259
PAUSE_ID = 50260
GPT2_BASE_VOCAB = 50257
GPT2_VOCAB = 50261  # base + 4 specials
COPY_EMBEDDING_FROM_ID = 16791  # '<<': new special rows start as a copy of it (as COCONUT does)
SPECIAL_IDS = (EOS_ID, BOT_ID, EOT_ID, LATENT_ID, PAUSE_ID)
ROW_MULTIPLE = 128  # embedding rows are padded to a multiple of this; padded rows are never sampled

DEFAULT_TOKENIZER = 'gpt2'


def padded_rows(n: int, multiple: int = ROW_MULTIPLE) -> int:
  return -(-n // multiple) * multiple


def load_tokenizer(name_or_dir: str = DEFAULT_TOKENIZER):
  """HF GPT2TokenizerFast with `<|bot|>` 50257, `<|eot|>` 50258, `<|latent|>` 50259, `<|pause|>` 50260.

  `name_or_dir`: a hub name ('gpt2'), a directory with vocab.json + merges.txt (HF layout), or a directory with
  encoder.json + vocab.bpe (OpenAI layout, e.g. ../shared/data/gpt2_tokenizer).
  """
  from transformers import GPT2TokenizerFast  # pylint: disable=g-import-not-at-top

  openai_vocab = os.path.join(name_or_dir, 'encoder.json')
  openai_merges = os.path.join(name_or_dir, 'vocab.bpe')
  if os.path.isfile(openai_vocab) and os.path.isfile(openai_merges):
    tok = GPT2TokenizerFast(vocab=openai_vocab, merges=openai_merges)
  elif os.path.isdir(name_or_dir) and not any(
      os.path.isfile(os.path.join(name_or_dir, f)) for f in ('vocab.json', 'tokenizer.json')):
    raise FileNotFoundError(f'Cannot load a GPT-2 tokenizer from {name_or_dir!r}: the directory has neither '
                            'vocab.json + merges.txt nor encoder.json + vocab.bpe.')
  else:
    try:
      tok = GPT2TokenizerFast.from_pretrained(name_or_dir)
    except (OSError, ValueError) as e:
      raise OSError(
          f'Cannot load a GPT-2 tokenizer from {name_or_dir!r}: give a hub name (needs network), a directory with '
          'vocab.json + merges.txt, or one with encoder.json + vocab.bpe (see ../shared/data/gpt2_tokenizer).'
      ) from e
  if len(tok) < GPT2_BASE_VOCAB or tok.convert_tokens_to_ids(EOS) != EOS_ID:
    raise ValueError(f'{name_or_dir!r} is not the GPT-2 vocabulary (size {len(tok)}, {EOS} not at {EOS_ID}).')
  tok.add_special_tokens({'additional_special_tokens': list(SPECIAL_TOKENS)})
  ids = tok.convert_tokens_to_ids(list(SPECIAL_TOKENS))
  if tuple(ids) != SPECIAL_IDS[1:]:
    raise ValueError(f'Special tokens got ids {ids}, expected {list(SPECIAL_IDS[1:])}: the tokenizer at '
                     f'{name_or_dir!r} already has added tokens.')
  tok.pad_token = EOS
  return tok


@dataclasses.dataclass(frozen=True)
class Vocab:
  """Model-id space. `gpt2_ids[m]` is the GPT-2 id of model id m (None: full vocabulary, identity map).

  The compact vocabulary puts the specials first: model ids 0..4 are eos, bot, eot, latent, pause.
  """

  gpt2_ids: tuple[int, ...] | None = None

  @classmethod
  def full(cls) -> Vocab:
    return cls(None)

  @classmethod
  def compact(cls, token_ids: Iterable[Iterable[int]]) -> Vocab:
    """The specials plus every GPT-2 id that occurs in `token_ids` (an iterable of id sequences)."""
    used = set()
    for seq in token_ids:
      used.update(int(i) for i in seq)
    bad = [i for i in used if not 0 <= i < GPT2_VOCAB]
    if bad:
      raise ValueError(f'Token ids out of the GPT-2 range [0, {GPT2_VOCAB}): {sorted(bad)[:5]}')
    rest = sorted(used - set(SPECIAL_IDS))
    return cls(tuple(SPECIAL_IDS) + tuple(rest))

  @property
  def is_full(self) -> bool:
    return self.gpt2_ids is None

  @property
  def num_tokens(self) -> int:
    """Real (sampleable) rows."""
    return GPT2_VOCAB if self.gpt2_ids is None else len(self.gpt2_ids)

  @property
  def num_rows(self) -> int:
    """Embedding rows: num_tokens padded to a multiple of 128."""
    return padded_rows(self.num_tokens)

  def _to_model_table(self) -> np.ndarray:
    table = np.full(GPT2_VOCAB, -1, np.int64)
    table[np.asarray(self.gpt2_ids)] = np.arange(len(self.gpt2_ids))
    return table

  def to_model(self, gpt2_ids: Sequence[int] | np.ndarray) -> np.ndarray:
    ids = np.asarray(gpt2_ids, np.int64)
    if self.gpt2_ids is None:
      return ids.astype(np.int32)
    out = self._table[ids]
    if (out < 0).any():
      missing = sorted(set(ids[out < 0].tolist()))
      raise KeyError(f'GPT-2 ids {missing[:10]} are not in the compact vocabulary (it was built from the training '
                     'data; rebuild it with the new data or use model.vocab="full").')
    return out.astype(np.int32)

  def to_gpt2(self, model_ids: Sequence[int] | np.ndarray) -> np.ndarray:
    ids = np.asarray(model_ids, np.int64)
    if self.gpt2_ids is None:
      return ids.astype(np.int32)
    return np.asarray(self.gpt2_ids, np.int64)[np.clip(ids, 0, len(self.gpt2_ids) - 1)].astype(np.int32)

  @property
  def _table(self) -> np.ndarray:
    cached = self.__dict__.get('_table_cache')
    if cached is None:
      cached = self._to_model_table()
      object.__setattr__(self, '_table_cache', cached)
    return cached

  def model_id(self, gpt2_id: int) -> int:
    return int(self.to_model([gpt2_id])[0])

  @property
  def eos(self) -> int:
    return self.model_id(EOS_ID)

  @property
  def bot(self) -> int:
    return self.model_id(BOT_ID)

  @property
  def eot(self) -> int:
    return self.model_id(EOT_ID)

  @property
  def latent(self) -> int:
    return self.model_id(LATENT_ID)

  @property
  def pause(self) -> int:
    return self.model_id(PAUSE_ID)

  def to_json(self) -> str:
    return json.dumps({'gpt2_ids': None if self.gpt2_ids is None else list(self.gpt2_ids)})

  @classmethod
  def from_json(cls, text: str) -> Vocab:
    ids = json.loads(text)['gpt2_ids']
    return cls(None if ids is None else tuple(int(i) for i in ids))


class Tokenizer:
  """Text <-> model ids: the HF GPT-2 tokenizer followed by the `Vocab` map."""

  def __init__(self, hf_tokenizer=None, vocab: Vocab | None = None):
    self.hf = hf_tokenizer if hf_tokenizer is not None else load_tokenizer()
    self.vocab = vocab if vocab is not None else Vocab.full()

  def encode_gpt2(self, text: str) -> list[int]:
    return self.hf.encode(text)

  def encode(self, text: str) -> np.ndarray:
    """[T] int32 model ids."""
    return self.vocab.to_model(self.hf.encode(text))

  def decode(self, model_ids: Sequence[int] | np.ndarray, skip_eos: bool = False) -> str:
    ids = self.vocab.to_gpt2(model_ids).tolist()
    if skip_eos:
      ids = [i for i in ids if i != EOS_ID]
    return self.hf.decode(ids)


def hf_tokenizer_for_vocab(hf_tokenizer, vocab: Vocab, model_max_length: int | None = None):
  """A transformers tokenizer (GPT2TokenizerFast) whose ids are `vocab`'s model ids: what an exported model's rows are.

  The byte-level BPE of `hf_tokenizer` (from `load_tokenizer`) with its token strings and merges unchanged and the
  ids relabelled: the GPT-2 token `vocab.gpt2_ids[m]` gets id m, the GPT-2 tokens outside the compact vocabulary
  follow at ids num_tokens.. in GPT-2 order. So every text splits into exactly GPT-2's tokens: text the compact
  vocabulary covers (the dataset's) gets exactly `Tokenizer.encode`'s ids; other text gets some ids >= num_tokens,
  which the model has no rows for (where `Tokenizer.encode` raises KeyError). Dropping those tokens instead would
  change the split of in-vocabulary text too: BPE reaches a token through merges whose intermediate tokens are
  mostly outside the compact vocabulary. Full vocabulary: the ids stay GPT-2's (plus the 4 specials at 50257..).
  <|endoftext|> is bos, eos, unk and pad; the DTT specials are additional special tokens.
  """
  from tokenizers import Tokenizer as BackendTokenizer  # pylint: disable=g-import-not-at-top
  from transformers import GPT2TokenizerFast  # pylint: disable=g-import-not-at-top

  relabel = np.arange(GPT2_VOCAB)
  if not vocab.is_full:
    relabel[np.asarray(vocab.gpt2_ids)] = np.arange(vocab.num_tokens)
    rest = np.setdiff1d(np.arange(GPT2_VOCAB), np.asarray(vocab.gpt2_ids))
    relabel[rest] = vocab.num_tokens + np.arange(rest.size)
  spec = json.loads(hf_tokenizer.backend_tokenizer.to_str())
  if len(spec['model']['vocab']) != GPT2_BASE_VOCAB or len(spec['added_tokens']) != len(SPECIAL_IDS):
    raise ValueError(f'Expected the GPT-2 tokenizer of `load_tokenizer` ({GPT2_BASE_VOCAB} tokens + the '
                     f'{len(SPECIAL_IDS)} specials), got {len(spec["model"]["vocab"])} + {len(spec["added_tokens"])}.')
  spec['model']['vocab'] = {s: int(relabel[i]) for s, i in spec['model']['vocab'].items()}
  for added in spec['added_tokens']:
    added['id'] = int(relabel[added['id']])
    # An added token keeps a given id only when the BPE vocabulary has it; otherwise it goes after the last id.
    spec['model']['vocab'][added['content']] = added['id']
  tok = GPT2TokenizerFast(tokenizer_object=BackendTokenizer.from_str(json.dumps(spec)), bos_token=EOS,
                          eos_token=EOS, unk_token=EOS, pad_token=EOS, additional_special_tokens=list(SPECIAL_TOKENS),
                          model_max_length=model_max_length or hf_tokenizer.model_max_length)
  got = tok.convert_tokens_to_ids([EOS, *SPECIAL_TOKENS])
  want = [vocab.model_id(i) for i in SPECIAL_IDS]
  if got != want:
    raise ValueError(f'The relabelled tokenizer gives the specials ids {got}, expected {want}.')
  return tok
