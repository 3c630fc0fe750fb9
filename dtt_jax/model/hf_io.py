"""Read and write Hugging Face GPT-2 checkpoints (`config.json` + `model.safetensors` / `pytorch_model.bin`).

safetensors needs no torch; `pytorch_model.bin` does. A hub name ('gpt2') is fetched with `huggingface_hub` when
online; a local directory always works offline. The exported directory loads with
`transformers.GPT2LMHeadModel.from_pretrained(dir)`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import numpy as np
from flax import nnx

from dtt_jax import tokens
from dtt_jax.model import lora
from dtt_jax.model.gpt2 import GPT2, GPT2Config

_IGNORED_SUFFIXES = ('.attn.bias', '.attn.masked_bias')  # causal-mask buffers of old checkpoints
_SUPPORTED_ARCHITECTURES = ('GPT2LMHeadModel', 'GPT2Model')


def _hf_variables(model: GPT2) -> Iterator[tuple[str, nnx.Variable]]:
  """(HF tensor name without the 'transformer.' prefix, our variable); weights share HF's [in, out] layout."""
  yield 'wte.weight', model.wte.embedding
  yield 'wpe.weight', model.wpe.embedding
  for i, block in enumerate(model.h):
    modules = {'ln_1': block.ln_1, 'attn.c_attn': block.attn.c_attn, 'attn.c_proj': block.attn.c_proj,
               'ln_2': block.ln_2, 'mlp.c_fc': block.mlp.c_fc, 'mlp.c_proj': block.mlp.c_proj}
    for name, module in modules.items():
      weight = module.scale if isinstance(module, nnx.LayerNorm) else module.kernel
      yield f'h.{i}.{name}.weight', weight
      yield f'h.{i}.{name}.bias', module.bias
  yield 'ln_f.weight', model.ln_f.scale
  yield 'ln_f.bias', model.ln_f.bias


def _resolve_dir(name_or_dir: str) -> str:
  if os.path.isdir(name_or_dir):
    return name_or_dir
  if os.path.exists(name_or_dir):
    raise NotADirectoryError(f'{name_or_dir!r} is a file; give the checkpoint directory (config.json + weights).')
  try:
    from huggingface_hub import snapshot_download  # pylint: disable=g-import-not-at-top
    return snapshot_download(name_or_dir, allow_patterns=['config.json', '*.safetensors', 'pytorch_model.bin'])
  except Exception as e:  # network, auth or unknown repo
    raise OSError(f'{name_or_dir!r} is not a local directory and could not be fetched from the hub ({e}). Offline, '
                  'pass a directory holding config.json and model.safetensors or pytorch_model.bin.') from e


def read_config(ckpt_dir: str) -> dict:
  path = os.path.join(ckpt_dir, 'config.json')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path} is missing: an HF GPT-2 checkpoint directory needs config.json.')
  with open(path) as f:
    hf = json.load(f)
  archs = hf.get('architectures') or ['GPT2LMHeadModel']
  if hf.get('model_type') != 'gpt2' or not set(archs) & set(_SUPPORTED_ARCHITECTURES):
    raise ValueError(f'{path}: model_type={hf.get("model_type")!r}, architectures={archs}; only GPT-2 '
                     f'({", ".join(_SUPPORTED_ARCHITECTURES)}) is supported.')
  checks = {'activation_function': ('gelu_new', hf.get('activation_function', 'gelu_new')),
            'scale_attn_weights': (True, hf.get('scale_attn_weights', True)),
            'scale_attn_by_inverse_layer_idx': (False, hf.get('scale_attn_by_inverse_layer_idx', False)),
            'n_inner': (None, None if hf.get('n_inner') in (None, 4 * hf['n_embd']) else hf['n_inner'])}
  for key, (want, got) in checks.items():
    if got != want:
      raise ValueError(f'{path}: {key}={got!r} is not supported (expected {want!r}).')
  return hf


def read_tensors(ckpt_dir: str) -> dict[str, np.ndarray]:
  """HF state dict as float32 numpy, names without the 'transformer.' prefix."""
  st_path = os.path.join(ckpt_dir, 'model.safetensors')
  bin_path = os.path.join(ckpt_dir, 'pytorch_model.bin')
  if os.path.isfile(st_path):
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    raw = load_file(st_path)
  elif os.path.isfile(bin_path):
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(f'{bin_path} needs torch to read (pip install torch==2.13.0), or convert it to '
                        'model.safetensors.') from e
    raw = {k: v.float().numpy() for k, v in torch.load(bin_path, map_location='cpu', weights_only=True).items()}
  else:
    raise FileNotFoundError(f'{ckpt_dir} has neither model.safetensors nor pytorch_model.bin.')
  out = {}
  for name, value in raw.items():
    if name.endswith(_IGNORED_SUFFIXES) or name == 'lm_head.weight':
      continue
    out[name.removeprefix('transformer.')] = np.asarray(value, np.float32)
  return out


def resize_rows(wte: np.ndarray, vocab: tokens.Vocab) -> np.ndarray:
  """Checkpoint token embedding [V_ckpt, D] -> [vocab.num_rows, D] in model-id order.

  Rows of ids the checkpoint lacks (the DTT specials) copy the `<<` row (id 16791), as COCONUT does; padding rows
  are zero (their logits are masked).
  """
  gpt2_ids = vocab.to_gpt2(np.arange(vocab.num_tokens))
  source = np.where(gpt2_ids < wte.shape[0], gpt2_ids, tokens.COPY_EMBEDDING_FROM_ID)
  rows = np.zeros((vocab.num_rows, wte.shape[1]), np.float32)
  rows[:vocab.num_tokens] = wte[source]
  return rows


def load_pretrained(name_or_dir: str, vocab: tokens.Vocab | None = None, dtype: str = 'float32',
                    seed: int = 0) -> GPT2:
  """A `GPT2` with the checkpoint's weights.

  vocab: None keeps the checkpoint's vocabulary as is (rows padded to a multiple of 128); a `tokens.Vocab` maps the
  rows into that vocabulary (full: GPT-2 + the 4 DTT specials; compact: the used ids), copying `<<` into new rows.
  """
  ckpt_dir = _resolve_dir(name_or_dir)
  hf = read_config(ckpt_dir)
  tensors = read_tensors(ckpt_dir)
  wte = tensors.get('wte.weight')
  if wte is None:
    raise KeyError(f'{ckpt_dir}: tensor transformer.wte.weight is missing.')
  if vocab is None:
    num_tokens = wte.shape[0]
    rows = np.zeros((tokens.padded_rows(num_tokens), wte.shape[1]), np.float32)
    rows[:num_tokens] = wte
  else:
    num_tokens, rows = vocab.num_tokens, resize_rows(wte, vocab)
  tensors['wte.weight'] = rows
  cfg = GPT2Config(vocab_rows=rows.shape[0], num_tokens=num_tokens, n_positions=hf['n_positions'],
                   n_embd=hf['n_embd'], n_layer=hf['n_layer'], n_head=hf['n_head'],
                   layer_norm_epsilon=hf.get('layer_norm_epsilon', 1e-5), dtype=dtype)
  model = GPT2(cfg, rngs=nnx.Rngs(seed))
  assign_hf_tensors(model, tensors, source=ckpt_dir)
  return model


def assign_hf_tensors(model: GPT2, tensors: dict[str, np.ndarray], source: str = 'checkpoint') -> None:
  for name, var in _hf_variables(model):
    if name not in tensors:
      raise KeyError(f'{source}: tensor transformer.{name} is missing.')
    value = tensors[name]
    if value.shape != var.value.shape:
      raise ValueError(f'{source}: tensor transformer.{name} has shape {value.shape}, expected {var.value.shape}.')
    var.value = np.asarray(value, var.value.dtype)


def export_pretrained(model: GPT2, out_dir: str, num_tokens: int | None = None,
                      eos_id: int = tokens.EOS_ID) -> None:
  """Write `config.json` + `model.safetensors` that `GPT2LMHeadModel.from_pretrained(out_dir)` loads.

  The first `num_tokens` embedding rows are exported (default: the model's real rows, without padding). LoRA
  adapters are merged into their base kernels first (`lora.merged`). `eos_id`: the row of <|endoftext|> (a compact
  vocabulary's `Vocab.eos`), written as the config's bos, eos and pad token id.
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  model = lora.merged(model)
  cfg = model.cfg
  n = cfg.num_tokens if num_tokens is None else num_tokens
  tensors = {f'transformer.{name}': np.asarray(var.value, np.float32) for name, var in _hf_variables(model)}
  tensors['transformer.wte.weight'] = tensors['transformer.wte.weight'][:n]
  tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
  os.makedirs(out_dir, exist_ok=True)
  save_file(tensors, os.path.join(out_dir, 'model.safetensors'), metadata={'format': 'pt'})
  config = {
      'architectures': ['GPT2LMHeadModel'], 'model_type': 'gpt2', 'vocab_size': n,
      'n_positions': cfg.n_positions, 'n_ctx': cfg.n_positions, 'n_embd': cfg.n_embd, 'n_layer': cfg.n_layer,
      'n_head': cfg.n_head, 'n_inner': None, 'activation_function': 'gelu_new',
      'layer_norm_epsilon': cfg.layer_norm_epsilon, 'initializer_range': cfg.initializer_range,
      'resid_pdrop': 0.0, 'embd_pdrop': 0.0, 'attn_pdrop': 0.0, 'scale_attn_weights': True,
      'tie_word_embeddings': True, 'bos_token_id': eos_id, 'eos_token_id': eos_id, 'pad_token_id': eos_id,
  }
  with open(os.path.join(out_dir, 'config.json'), 'w') as f:
    json.dump(config, f, indent=2)
