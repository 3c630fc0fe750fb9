"""The tokenizer with the DTT special tokens, and the model vocabulary.

The tokenizer (`load_tokenizer`, its source picked by `tokenizer_source`) is GPT-2's, or a Llama / Qwen2
checkpoint's own (`config.model.init` a directory or hub name holding one: transformers' AutoTokenizer). GPT-2's
gives the DTT specials the fixed ids 50257..50260 (SPEC §2); a checkpoint's gives them the ids after its whole
vocabulary (`len(tokenizer)` + k), keeps its own eos and pad, and the checkpoint's embedding (and untied lm_head)
rows grow to cover them (`hf_io.load_model`).

Tokenizer ids are what users see (tokenizer output, datasets, completions); the code and the saved files still call
them GPT-2 ids (`gpt2_ids`), which they are for GPT-2. Model ids index the model's embedding rows. With the full
vocabulary they are the same; with the compact vocabulary (SPEC §2, GPT-2 only) model ids are a dense remapping of
the GPT-2 ids that occur in the training data plus the specials, which makes tiny CPU models 10-50x cheaper.
`Vocab` maps between the two, knows where its tokenizer puts eos and the specials, and is saved with every
checkpoint.
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
# Files of a transformers tokenizer: a checkpoint directory holding one of these has its own tokenizer.
TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'tokenizer.model', 'vocab.json')


def padded_rows(n: int, multiple: int = ROW_MULTIPLE) -> int:
  return -(-n // multiple) * multiple


def load_tokenizer(name_or_dir: str = DEFAULT_TOKENIZER):
  """The transformers tokenizer with the DTT specials `<|bot|>`, `<|eot|>`, `<|latent|>`, `<|pause|>`.

  `name_or_dir`: a directory with encoder.json + vocab.bpe (OpenAI's GPT-2 layout, e.g.
  ../shared/data/gpt2_tokenizer), a directory with vocab.json + merges.txt (GPT-2, HF layout), a directory a
  transformers tokenizer was saved to (tokenizer.json / tokenizer_config.json: a checkpoint's), or a hub name.
  GPT-2's vocabulary (`<|endoftext|>` at 50256): GPT2TokenizerFast, the specials at 50257..50260, pad =
  `<|endoftext|>`. Any other: transformers' AutoTokenizer as is, the specials added after its vocabulary (ids
  `len(tokenizer)` + k; kept where it already has them last, as a dtt_jax export has), its own eos, its pad (eos
  when it has none); `full_vocab` of it is its `Vocab`.
  """
  # AutoTokenizer only where needed: importing it imports torch when installed (seconds per process)
  from transformers import GPT2TokenizerFast  # pylint: disable=g-import-not-at-top

  openai_vocab = os.path.join(name_or_dir, 'encoder.json')
  openai_merges = os.path.join(name_or_dir, 'vocab.bpe')
  is_dir = os.path.isdir(name_or_dir)
  if os.path.isfile(openai_vocab) and os.path.isfile(openai_merges):
    tok = GPT2TokenizerFast(vocab=openai_vocab, merges=openai_merges)
  elif is_dir and not any(os.path.isfile(os.path.join(name_or_dir, f)) for f in TOKENIZER_FILES):
    raise FileNotFoundError(f'Cannot load a tokenizer from {name_or_dir!r}: the directory has neither '
                            'vocab.json + merges.txt, encoder.json + vocab.bpe (GPT-2) nor tokenizer.json / '
                            'tokenizer_config.json (a checkpoint\'s tokenizer, saved by transformers).')
  else:
    hf_saved = any(os.path.isfile(os.path.join(name_or_dir, f)) for f in ('tokenizer.json', 'tokenizer_config.json'))
    try:  # a bare vocab.json + merges.txt is GPT-2's (AutoTokenizer cannot tell its class)
      if hf_saved or not is_dir:
        from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
        tok = AutoTokenizer.from_pretrained(name_or_dir)
      else:
        tok = GPT2TokenizerFast.from_pretrained(name_or_dir)
    except (OSError, ValueError) as e:
      raise OSError(
          f'Cannot load a tokenizer from {name_or_dir!r}: give a hub name (needs network), a directory with '
          'vocab.json + merges.txt or encoder.json + vocab.bpe (GPT-2, see ../shared/data/gpt2_tokenizer), or a '
          'checkpoint directory with tokenizer.json (transformers\' save_pretrained).') from e
  if len(tok) < GPT2_BASE_VOCAB or tok.convert_tokens_to_ids(EOS) != EOS_ID:
    return _with_specials_after(tok, name_or_dir)
  tok.add_special_tokens({'additional_special_tokens': list(SPECIAL_TOKENS)})
  ids = tok.convert_tokens_to_ids(list(SPECIAL_TOKENS))
  if tuple(ids) != SPECIAL_IDS[1:]:
    raise ValueError(f'Special tokens got ids {ids}, expected {list(SPECIAL_IDS[1:])}: the tokenizer at '
                     f'{name_or_dir!r} already has added tokens.')
  tok.pad_token = EOS
  return tok


def _with_specials_after(tok, source: str):
  """A checkpoint's own tokenizer `tok` (not GPT-2's) with the DTT specials after its vocabulary; sets
  `tok.dtt_vocab`, its full `Vocab` (what `full_vocab` returns)."""
  size = len(tok)
  vocab = tok.get_vocab()
  have = [vocab.get(s) for s in SPECIAL_TOKENS]
  if all(i is None for i in have):
    tok.add_special_tokens({'additional_special_tokens': list(SPECIAL_TOKENS)}, replace_extra_special_tokens=False)
    base = size
  else:
    base = size - len(SPECIAL_TOKENS)
  ids = tok.convert_tokens_to_ids(list(SPECIAL_TOKENS))
  if ids != list(range(base, base + len(SPECIAL_TOKENS))):
    raise ValueError(f'The tokenizer of {source!r} has the DTT specials {list(SPECIAL_TOKENS)} at ids {have}; '
                     f'dtt_jax needs them after its vocabulary, at {base}..{base + len(SPECIAL_TOKENS) - 1}: save '
                     'the tokenizer without them (dtt_jax adds them) or with all four last.')
  if tok.eos_token_id is None:
    raise ValueError(f'The tokenizer of {source!r} has no eos token (tokenizer_config.json "eos_token"): dtt_jax '
                     'ends every completion with it.')
  if tok.pad_token is None:
    tok.pad_token = tok.eos_token
  own_specials = set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items() if t.special}
  copy_from = tok.encode('<<', add_special_tokens=False)
  tok.dtt_vocab = Vocab(None, base=base, eos_id=tok.eos_token_id,
                        reserved_ids=tuple(sorted(i for i in own_specials if i < base)),
                        copy_id=int(copy_from[0]), checkpoint_ids=size)
  return tok


def full_vocab(hf_tokenizer) -> Vocab:
  """The full vocabulary of a tokenizer from `load_tokenizer`: `Vocab.full()` for GPT-2's, the checkpoint
  tokenizer's own layout otherwise."""
  return getattr(hf_tokenizer, 'dtt_vocab', None) or Vocab.full()


@dataclasses.dataclass(frozen=True)
class Vocab:
  """Model-id space over a tokenizer's ids. `gpt2_ids[m]` is the tokenizer id of model id m (None: full vocabulary,
  identity map).

  The compact vocabulary (GPT-2's tokenizer only) puts the specials first: model ids 0..4 are eos, bot, eot,
  latent, pause. The other fields say where the tokenizer puts things; their defaults are GPT-2's:
  base       the tokenizer's ids before the DTT specials, which follow at base..base+3 (GPT-2: 50257)
  eos_id     its eos (and the padding id; SPEC §2) (GPT-2: <|endoftext|> 50256)
  reserved_ids  its own special tokens below base: never text, never filler (GPT-2: eos)
  copy_id    the row that new special rows start as a copy of: `<<` (GPT-2: 16791; another tokenizer: the first
             token of `<<`)
  checkpoint_ids  None: GPT-2's tokenizer (a checkpoint's rows for ids it has are used, SPEC §2); a checkpoint's own
             tokenizer: its size as the checkpoint was saved with it (base, or base + 4 when it already had the
             specials): rows of ids below it come from the checkpoint, the rest copy `copy_id`'s
  """

  gpt2_ids: tuple[int, ...] | None = None
  base: int = GPT2_BASE_VOCAB
  eos_id: int = EOS_ID
  reserved_ids: tuple[int, ...] = (EOS_ID,)
  copy_id: int = COPY_EMBEDDING_FROM_ID
  checkpoint_ids: int | None = None

  @classmethod
  def full(cls, hf_tokenizer=None) -> Vocab:
    """The full vocabulary of `hf_tokenizer` (`full_vocab`); None: GPT-2's."""
    return cls(None) if hf_tokenizer is None else full_vocab(hf_tokenizer)

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
  def is_gpt2(self) -> bool:
    """Whether the tokenizer is GPT-2's (not a checkpoint's own)."""
    return self.checkpoint_ids is None

  @property
  def special_ids(self) -> tuple[int, ...]:
    """Tokenizer ids of eos, bot, eot, latent, pause (GPT-2: SPECIAL_IDS)."""
    return (self.eos_id,) + tuple(range(self.base, self.base + len(SPECIAL_TOKENS)))

  @property
  def num_tokens(self) -> int:
    """Real (sampleable) rows."""
    return self.base + len(SPECIAL_TOKENS) if self.gpt2_ids is None else len(self.gpt2_ids)

  def text_ids(self) -> np.ndarray:
    """[K] int32 model ids of the text tokens: every id but the tokenizer's own specials and the DTT ones."""
    if self.is_full:
      return np.setdiff1d(np.arange(self.base), np.asarray(self.reserved_ids, np.int64)).astype(np.int32)
    special = set(self.special_ids)
    return np.array([m for m, g in enumerate(self.gpt2_ids) if g not in special], np.int32)

  @property
  def num_rows(self) -> int:
    """Embedding rows: num_tokens padded to a multiple of 128."""
    return padded_rows(self.num_tokens)

  def _to_model_table(self) -> np.ndarray:
    table = np.full(self.base + len(SPECIAL_TOKENS), -1, np.int64)
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
    return self.model_id(self.eos_id)

  @property
  def bot(self) -> int:
    return self.model_id(self.base)

  @property
  def eot(self) -> int:
    return self.model_id(self.base + 1)

  @property
  def latent(self) -> int:
    return self.model_id(self.base + 2)

  @property
  def pause(self) -> int:
    return self.model_id(self.base + 3)

  def to_json(self) -> str:
    """{'gpt2_ids': [...] | null}, plus 'tokenizer' (the other fields) for a checkpoint's own tokenizer."""
    out = {'gpt2_ids': None if self.gpt2_ids is None else list(self.gpt2_ids)}
    if not self.is_gpt2:
      out['tokenizer'] = {'base': self.base, 'eos_id': self.eos_id, 'reserved_ids': list(self.reserved_ids),
                          'copy_id': self.copy_id, 'checkpoint_ids': self.checkpoint_ids}
    return json.dumps(out)

  @classmethod
  def from_json(cls, text: str) -> Vocab:
    spec = json.loads(text)
    ids, layout = spec['gpt2_ids'], dict(spec.get('tokenizer') or {})
    if 'reserved_ids' in layout:
      layout['reserved_ids'] = tuple(layout['reserved_ids'])
    return cls(None if ids is None else tuple(int(i) for i in ids), **layout)


class Tokenizer:
  """Text <-> model ids: the HF tokenizer (`load_tokenizer`) followed by the `Vocab` map.

  A full `vocab` (or None) is the full vocabulary of `hf_tokenizer` (`full_vocab`: a checkpoint's own tokenizer
  has its own layout); a compact one needs GPT-2's tokenizer. Text is encoded without the tokenizer's bos / eos
  (dtt_jax joins encoded pieces and places eos itself); decoding writes the tokenizer's eos as `<|endoftext|>`, the
  marker answers end at (SPEC §2), when its eos is another token.
  """

  def __init__(self, hf_tokenizer=None, vocab: Vocab | None = None):
    self.hf = hf_tokenizer if hf_tokenizer is not None else load_tokenizer()
    full = full_vocab(self.hf)
    if vocab is None or (vocab.is_full and vocab in (Vocab.full(), full)):
      vocab = full
    elif vocab.is_full or not full.is_gpt2:
      source = getattr(self.hf, 'name_or_path', '')
      raise ValueError(f'The vocabulary ({vocab.to_json()[:200]}) was not made from this tokenizer ({source!r}, '
                       f'full vocabulary {full.to_json()[:200]}); the compact vocabulary needs GPT-2\'s tokenizer '
                       '(config.model.vocab="full" with a checkpoint\'s own).')
    self.vocab = vocab

  def encode_gpt2(self, text: str) -> list[int]:
    """Tokenizer ids (GPT-2's for GPT-2's tokenizer)."""
    return self.hf.encode(text, add_special_tokens=False)

  def encode(self, text: str) -> np.ndarray:
    """[T] int32 model ids."""
    return self.vocab.to_model(self.encode_gpt2(text))

  def decode(self, model_ids: Sequence[int] | np.ndarray, skip_eos: bool = False) -> str:
    ids = self.vocab.to_gpt2(model_ids).tolist()
    if skip_eos:
      ids = [i for i in ids if i != self.vocab.eos_id]
    text = self.hf.decode(ids)
    if self.vocab.is_gpt2 or self.hf.eos_token == EOS:
      return text
    return text.replace(self.hf.eos_token, EOS)

  def export_special_ids(self) -> dict[str, int | None]:
    """config.json's bos / eos / pad token ids of an exported model (model ids): the tokenizer's own for a
    checkpoint's tokenizer (bos None when it has none), the eos row for all three with GPT-2's."""
    if self.vocab.is_gpt2:
      return dict.fromkeys(('bos_token_id', 'eos_token_id', 'pad_token_id'), self.vocab.eos)
    ids = {'bos_token_id': self.hf.bos_token_id, 'eos_token_id': self.vocab.eos_id,
           'pad_token_id': self.hf.pad_token_id}
    return {k: None if v is None else self.vocab.model_id(v) for k, v in ids.items()}


def hf_tokenizer_for_vocab(hf_tokenizer, vocab: Vocab, model_max_length: int | None = None):
  """A transformers tokenizer (GPT2TokenizerFast) whose ids are `vocab`'s model ids: what an exported model's rows are.

  The byte-level BPE of `hf_tokenizer` (from `load_tokenizer`) with its token strings and merges unchanged and the
  ids relabelled: the GPT-2 token `vocab.gpt2_ids[m]` gets id m, the GPT-2 tokens outside the compact vocabulary
  follow at ids num_tokens.. in GPT-2 order. So every text splits into exactly GPT-2's tokens: text the compact
  vocabulary covers (the dataset's) gets exactly `Tokenizer.encode`'s ids; other text gets some ids >= num_tokens,
  which the model has no rows for (where `Tokenizer.encode` raises KeyError). Dropping those tokens instead would
  change the split of in-vocabulary text too: BPE reaches a token through merges whose intermediate tokens are
  mostly outside the compact vocabulary. Full vocabulary: the ids stay GPT-2's (plus the 4 specials at 50257..).
  <|endoftext|> is bos, eos, unk and pad; the DTT specials are additional special tokens. A checkpoint's own tokenizer
  (`vocab.is_gpt2` false, full vocabulary): `hf_tokenizer` itself, its ids already the model's (the specials last).
  """
  if not vocab.is_gpt2:  # a checkpoint's own tokenizer (full vocabulary): its ids are the model's already
    if not vocab.is_full or full_vocab(hf_tokenizer) != vocab:
      raise ValueError('hf_tokenizer_for_vocab: `vocab` is not the full vocabulary of `hf_tokenizer`.')
    return hf_tokenizer
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
