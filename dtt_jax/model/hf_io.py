"""Read and write Hugging Face checkpoints: GPT-2 (`config.json` + `model.safetensors` / `pytorch_model.bin`) and
the Llama family (Llama, Qwen2: `config.json` + `model.safetensors` or shards `model-0000i-of-0000n.safetensors` named
by `model.safetensors.index.json`).

safetensors needs no torch; `pytorch_model.bin` does. A hub name ('gpt2') is fetched with `huggingface_hub` when
online; a local directory always works offline. `model_family(config_json)` names the family from `model_type`;
`load_model` picks the loader by it. An exported directory loads with `transformers.GPT2LMHeadModel` /
`AutoModelForCausalLM.from_pretrained(dir)` and gives the same logits.

Rows for a dtt_jax vocabulary (`vocab_row_source`): with GPT-2's tokenizer a model row takes the checkpoint row of
its GPT-2 id (the checkpoint must have GPT-2's rows); with a checkpoint's own tokenizer (`tokens.load_tokenizer` of
a Llama / Qwen2 directory) the row of its tokenizer id. Rows of the DTT specials the checkpoint lacks start as
copies of the `<<` row.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dtt_jax import tokens
from dtt_jax.model import lora
from dtt_jax.model.gpt2 import GPT2, GPT2Config
from dtt_jax.model.llama import Llama, LlamaConfig

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


_GPT2_FILES = ('config.json', '*.safetensors', 'pytorch_model.bin')


def _resolve_dir(name_or_dir: str, allow_patterns: tuple[str, ...] = _GPT2_FILES) -> str:
  if os.path.isdir(name_or_dir):
    return name_or_dir
  if os.path.exists(name_or_dir):
    raise NotADirectoryError(f'{name_or_dir!r} is a file; give the checkpoint directory (config.json + weights).')
  try:
    from huggingface_hub import snapshot_download  # pylint: disable=g-import-not-at-top
    return snapshot_download(name_or_dir, allow_patterns=list(allow_patterns))
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
  rows = np.zeros((vocab.num_rows, wte.shape[1]), np.float32)
  rows[:vocab.num_tokens] = wte[vocab_row_source(vocab, wte.shape[0])]
  return rows


def gpt2_row_source(vocab: tokens.Vocab, ckpt_rows: int) -> np.ndarray:
  """-> [vocab.num_tokens] the checkpoint row each model row starts from: its GPT-2 id, or the `<<` row (id 16791)
  for ids the checkpoint's `ckpt_rows` lack (the DTT specials)."""
  gpt2_ids = vocab.to_gpt2(np.arange(vocab.num_tokens))
  return np.where(gpt2_ids < ckpt_rows, gpt2_ids, tokens.COPY_EMBEDDING_FROM_ID)


def vocab_row_source(vocab: tokens.Vocab, ckpt_rows: int, source: str = 'the checkpoint') -> np.ndarray:
  """-> [vocab.num_tokens] the checkpoint row each model row starts from. GPT-2's tokenizer: `gpt2_row_source`. A
  checkpoint's own tokenizer: the row of its tokenizer id for the ids the checkpoint was saved with
  (`vocab.checkpoint_ids`; its padding rows beyond them are dropped), the `<<` row (`vocab.copy_id`) for the DTT
  specials its tokenizer lacked."""
  if vocab.is_gpt2:
    return gpt2_row_source(vocab, ckpt_rows)
  if ckpt_rows < vocab.checkpoint_ids:
    raise ValueError(f'{source}: {ckpt_rows} token rows, but its tokenizer has {vocab.checkpoint_ids} ids: the '
                     'tokenizer saved with the checkpoint must be the one it was trained with.')
  ids = vocab.to_gpt2(np.arange(vocab.num_tokens))
  return np.where(ids < vocab.checkpoint_ids, ids, vocab.copy_id)


def load_pretrained(name_or_dir: str, vocab: tokens.Vocab | None = None, dtype: str = 'float32',
                    seed: int = 0, param_dtype: str = 'float32') -> GPT2:
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
                   layer_norm_epsilon=hf.get('layer_norm_epsilon', 1e-5), dtype=dtype, param_dtype=param_dtype)
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


# ---- Family dispatch and the Llama family (Llama, Qwen2) ----

FAMILIES = {'gpt2': 'gpt2', 'llama': 'llama', 'qwen2': 'qwen2'}  # HF model_type -> family
_LLAMA_ARCHITECTURES = {'llama': 'LlamaForCausalLM', 'qwen2': 'Qwen2ForCausalLM'}
_LLAMA_FILES = ('config.json', '*.safetensors', 'model.safetensors.index.json')
_LLAMA_LINEARS = ('self_attn.q_proj', 'self_attn.k_proj', 'self_attn.v_proj', 'self_attn.o_proj', 'mlp.gate_proj',
                  'mlp.up_proj', 'mlp.down_proj')


def model_family(config_json: dict) -> str:
  """An HF `config.json` (as a dict) -> 'gpt2' | 'llama' | 'qwen2', from its `model_type`."""
  model_type = config_json.get('model_type')
  if model_type not in FAMILIES:
    raise ValueError(f'config.json model_type={model_type!r} (architectures={config_json.get("architectures")}) is '
                     f'not supported; supported model_type values: {", ".join(FAMILIES)}.')
  return FAMILIES[model_type]


def read_config_json(ckpt_dir: str) -> dict:
  """`config.json` of a checkpoint directory, unchecked."""
  path = os.path.join(ckpt_dir, 'config.json')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path} is missing: an HF checkpoint directory needs config.json.')
  with open(path) as f:
    return json.load(f)


def tokenizer_source(model_cfg, gpt2_dir: str) -> str:
  """Where the run's tokenizer comes from (`load_tokenizer`'s argument), from the `config.model` section:
  `tokenizer` when set; else the checkpoint `init` itself when it is a Llama / Qwen2 checkpoint with a tokenizer
  of its own (`tokens.TOKENIZER_FILES`; a hub name's are fetched); else GPT-2's (`gpt2_dir` when it exists, else the
  hub's 'gpt2'). GPT-2 checkpoints, and Llama-family ones without a tokenizer (their rows must then be GPT-2's),
  use GPT-2's."""
  if model_cfg.tokenizer:
    return model_cfg.tokenizer
  if model_cfg.init != 'scratch' and _has_own_tokenizer(model_cfg.init):
    return model_cfg.init
  return gpt2_dir if os.path.isdir(gpt2_dir) else tokens.DEFAULT_TOKENIZER


def _has_own_tokenizer(init: str) -> bool:
  """Whether the checkpoint `init` (a directory or hub name) is of the Llama family and has tokenizer files."""
  ckpt_dir = init
  if not os.path.isdir(init):
    try:
      from huggingface_hub import snapshot_download  # pylint: disable=g-import-not-at-top
      ckpt_dir = snapshot_download(init, allow_patterns=['config.json', *tokens.TOKENIZER_FILES])
    except Exception:  # pylint: disable=broad-except  (offline or unknown: loading the model names the problem)
      return False
  if model_family(read_config_json(ckpt_dir)) == 'gpt2':
    return False
  return any(os.path.isfile(os.path.join(ckpt_dir, f)) for f in tokens.TOKENIZER_FILES)


def load_model(name_or_dir: str, vocab: tokens.Vocab | None = None, dtype: str = 'float32',
               seed: int = 0, param_dtype: str = 'float32') -> GPT2 | Llama:
  """The checkpoint's model, its class picked by `model_family` of its config.json (`config.model.init`), computing
  in `dtype` with its parameters stored in `param_dtype` (`config.model.dtype`, `config.model.param_dtype`).

  vocab: None keeps the checkpoint's vocabulary; a `tokens.Vocab` (GPT-2's ids, or the checkpoint tokenizer's:
  `vocab_row_source`) maps the rows into it, the DTT specials' new rows copying `<<`, for either family."""
  ckpt_dir = _resolve_dir(name_or_dir, tuple(sorted(set(_GPT2_FILES) | set(_LLAMA_FILES))))
  family = model_family(read_config_json(ckpt_dir))
  if family == 'gpt2':
    return load_pretrained(ckpt_dir, vocab=vocab, dtype=dtype, seed=seed, param_dtype=param_dtype)
  return load_llama(ckpt_dir, dtype=dtype, seed=seed, vocab=vocab, param_dtype=param_dtype)


def _rope_items(hf: dict, path: str) -> tuple[float, tuple[tuple[str, object], ...]]:
  """-> (rope_theta, sorted rope-scaling items) from transformers 5's `rope_parameters` or the older top-level
  `rope_theta` + `rope_scaling` ('type' or 'rope_type')."""
  params = dict(hf.get('rope_parameters') or {})
  params.update(hf.get('rope_scaling') or {})
  theta = float(params.pop('rope_theta', hf.get('rope_theta', 10000.0)))
  kind = params.pop('rope_type', params.pop('type', 'default'))
  factor = params.get('partial_rotary_factor', hf.get('partial_rotary_factor', 1.0))
  if factor != 1.0:
    raise ValueError(f'{path}: partial_rotary_factor={factor} is not supported (RoPE over the whole head).')
  if kind == 'default':
    return theta, ()
  if kind == 'llama3':
    params.setdefault('original_max_position_embeddings', hf['max_position_embeddings'])
  params['rope_type'] = kind
  return theta, tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in params.items()))


def llama_config(hf: dict, vocab_rows: int, num_tokens: int, dtype: str = 'float32',
                 path: str = 'config.json', param_dtype: str = 'float32') -> LlamaConfig:
  """An HF Llama / Qwen2 config.json (dict) -> LlamaConfig; unsupported settings raise naming their key."""
  family = model_family(hf)
  if family not in _LLAMA_ARCHITECTURES:
    raise ValueError(f'{path}: model_type={hf.get("model_type")!r} is not a Llama-family model.')
  act = hf.get('hidden_act', 'silu')
  if act != 'silu':
    raise ValueError(f'{path}: hidden_act={act!r} is not supported (expected "silu").')
  if family == 'qwen2' and (hf.get('use_sliding_window') or 'sliding_attention' in (hf.get('layer_types') or ())):
    raise ValueError(f'{path}: use_sliding_window / layer_types "sliding_attention" is not supported (full '
                     'attention only); set use_sliding_window=false if the sequences fit the window.')
  n_head = hf['num_attention_heads']
  theta, scaling = _rope_items(hf, path)
  attention_bias = family == 'llama' and hf.get('attention_bias', False)
  return LlamaConfig(
      vocab_rows=vocab_rows, num_tokens=num_tokens, n_positions=hf['max_position_embeddings'],
      n_embd=hf['hidden_size'], n_layer=hf['num_hidden_layers'], n_head=n_head,
      n_kv_head=hf.get('num_key_value_heads') or n_head, head_dim=hf.get('head_dim') or hf['hidden_size'] // n_head,
      intermediate_size=hf['intermediate_size'], rms_norm_eps=hf.get('rms_norm_eps', 1e-6), rope_theta=theta,
      rope_scaling=scaling, tie_word_embeddings=bool(hf.get('tie_word_embeddings', False)),
      qkv_bias=family == 'qwen2' or attention_bias, o_bias=attention_bias,
      mlp_bias=family == 'llama' and hf.get('mlp_bias', False), family=family,
      initializer_range=hf.get('initializer_range', 0.02), dtype=dtype, param_dtype=param_dtype)


def _llama_entries(model: Llama) -> Iterator[tuple[str, nnx.Module, str, bool]]:
  """(HF tensor name, owning module, attribute, transposed): HF Linear weights are [out, in], our kernels [in, out];
  HF's lm_head.weight [V, D] is our `lm_head.embedding` (untied checkpoints only)."""
  yield 'model.embed_tokens.weight', model.wte, 'embedding', False
  for i, block in enumerate(model.layers):
    prefix = f'model.layers.{i}.'
    yield prefix + 'input_layernorm.weight', block.input_layernorm, 'weight', False
    yield prefix + 'post_attention_layernorm.weight', block.post_attention_layernorm, 'weight', False
    for name in _LLAMA_LINEARS:
      parent, attr = name.split('.')
      linear = getattr(getattr(block, parent), attr)
      yield f'{prefix}{name}.weight', linear, 'kernel', True
      if linear.bias is not None:
        yield f'{prefix}{name}.bias', linear, 'bias', False
  yield 'model.norm.weight', model.norm, 'weight', False
  if model.lm_head is not None:
    yield 'lm_head.weight', model.lm_head, 'embedding', False


def read_safetensors(ckpt_dir: str) -> dict[str, np.ndarray]:
  """All tensors of `model.safetensors`, or of the shards `model.safetensors.index.json` names, as float32 numpy
  (bfloat16 / float16 checkpoints included)."""
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  index = os.path.join(ckpt_dir, 'model.safetensors.index.json')
  if os.path.isfile(index):
    with open(index) as f:
      weight_map = json.load(f)['weight_map']
    files = sorted(set(weight_map.values()))
  elif os.path.isfile(os.path.join(ckpt_dir, 'model.safetensors')):
    files = ['model.safetensors']
  else:
    raise FileNotFoundError(f'{ckpt_dir} has neither model.safetensors nor model.safetensors.index.json (a '
                            'pytorch_model.bin checkpoint: re-save it with safe_serialization=True).')
  out = {}
  with jax.default_device(jax.devices('cpu')[0]):  # 'flax' reads bfloat16, which numpy cannot
    for name in files:
      path = os.path.join(ckpt_dir, name)
      if not os.path.isfile(path):
        raise FileNotFoundError(f'{path} is missing (named by {index}).')
      with safe_open(path, framework='flax') as f:
        for key in f.keys():
          out[key] = np.asarray(f.get_tensor(key).astype(jnp.float32))
  return out


def _rows(table: np.ndarray, num_rows: int, row_source: np.ndarray | None) -> np.ndarray:
  """Checkpoint table [V, D] -> [num_rows, D]: row i = table[row_source[i]] (default: row i), the rest zero."""
  rows = np.zeros((num_rows, table.shape[1]), np.float32)
  if row_source is None:
    rows[:table.shape[0]] = table
  else:
    rows[:len(row_source)] = table[np.asarray(row_source)]
  return rows


def load_llama(name_or_dir: str, dtype: str = 'float32', seed: int = 0,
               row_source: np.ndarray | None = None, vocab: tokens.Vocab | None = None,
               param_dtype: str = 'float32') -> Llama:
  """A `Llama` (Llama or Qwen2 checkpoint) with the checkpoint's weights.

  Embedding rows (and lm_head rows, untied) are padded to a multiple of 128; padded logits are masked.
  row_source [N] int: model row i copies checkpoint row row_source[i] (a remapped or grown vocabulary: new special
  tokens as copies of an existing row); num_tokens = N. vocab: the rows of a dtt_jax vocabulary instead
  (`vocab_row_source`): with GPT-2's tokenizer read as GPT-2 token ids (the checkpoint must have GPT-2's token rows);
  with the checkpoint's own tokenizer its ids, grown by the DTT specials (untied: lm_head's rows too)."""
  ckpt_dir = _resolve_dir(name_or_dir, _LLAMA_FILES)
  path = os.path.join(ckpt_dir, 'config.json')
  hf = read_config_json(ckpt_dir)
  tensors = read_safetensors(ckpt_dir)
  if 'model.embed_tokens.weight' not in tensors:
    raise KeyError(f'{ckpt_dir}: tensor model.embed_tokens.weight is missing.')
  if vocab is not None:
    ckpt_rows = tensors['model.embed_tokens.weight'].shape[0]
    most = tokens.padded_rows(tokens.GPT2_VOCAB)
    if vocab.is_gpt2 and not tokens.GPT2_BASE_VOCAB <= ckpt_rows <= most:
      raise ValueError(f'{ckpt_dir}: {ckpt_rows} token rows, but dtt_jax tokenizes with GPT-2\'s tokenizer, so a '
                       f'{model_family(hf)} checkpoint must have GPT-2\'s rows ({tokens.GPT2_BASE_VOCAB} to {most}: '
                       'with the DTT specials or padding). A checkpoint with its own tokenizer: save the tokenizer '
                       'in its directory (tokenizer.json) and leave config.model.tokenizer empty.')
    row_source = vocab_row_source(vocab, ckpt_rows, ckpt_dir)
  num_tokens = tensors['model.embed_tokens.weight'].shape[0] if row_source is None else len(row_source)
  num_rows = tokens.padded_rows(num_tokens)
  if 'tie_word_embeddings' not in hf:  # absent: tied exactly when the checkpoint has no separate output layer
    hf = dict(hf, tie_word_embeddings='lm_head.weight' not in tensors)
  cfg = llama_config(hf, num_rows, num_tokens, dtype, path, param_dtype)
  for name in ('model.embed_tokens.weight', 'lm_head.weight'):
    if name in tensors:
      tensors[name] = _rows(tensors[name], num_rows, row_source)
  model = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(seed)))  # shapes only: no random init to overwrite
  for name, owner, attr, transposed in _llama_entries(model):
    if name not in tensors:
      raise KeyError(f'{ckpt_dir}: tensor {name} is missing'
                     + (' (config.json says tie_word_embeddings=false).' if name == 'lm_head.weight' else '.'))
    var = getattr(owner, attr)
    value = tensors[name].T if transposed else tensors[name]
    shape = tuple(var.value.shape)
    if value.shape != shape:
      raise ValueError(f'{ckpt_dir}: tensor {name} has shape {tensors[name].shape}, expected '
                       f'{shape[::-1] if transposed else shape} (from config.json).')
    var.value = jnp.asarray(value, var.value.dtype)
  abstract = [jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_leaves_with_path(nnx.state(model))
              if isinstance(x, jax.ShapeDtypeStruct)]
  if abstract:  # every parameter comes from the checkpoint
    raise AssertionError(f'load_llama left parameters without checkpoint values: {abstract}')
  return model


def export_llama(model: Llama, out_dir: str, num_tokens: int | None = None,
                 special_ids: dict[str, int | list[int] | None] | None = None) -> None:
  """Write `config.json` + `model.safetensors` that `AutoModelForCausalLM.from_pretrained(out_dir)` loads as
  LlamaForCausalLM / Qwen2ForCausalLM with the same logits.

  The first `num_tokens` rows are exported (default: the model's real rows). LoRA adapters (`lora.LoRALinear`) are
  folded into their kernels. special_ids: e.g. {'bos_token_id': 1, 'eos_token_id': [2, 3], 'pad_token_id': None},
  written into config.json (default: none)."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  cfg = model.cfg
  n = cfg.num_tokens if num_tokens is None else num_tokens
  tensors = {}
  for name, owner, attr, transposed in _llama_entries(model):
    if attr == 'kernel' and isinstance(owner, lora.LoRALinear):
      value = owner.merged_kernel()
    else:
      value = getattr(owner, attr)[...]
    value = np.asarray(value, np.float32)
    tensors[name] = value.T if transposed else value
  for name in ('model.embed_tokens.weight', 'lm_head.weight'):
    if name in tensors:
      tensors[name] = tensors[name][:n]
  tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
  os.makedirs(out_dir, exist_ok=True)
  save_file(tensors, os.path.join(out_dir, 'model.safetensors'), metadata={'format': 'pt'})
  scaling = dict(cfg.rope_scaling) or None
  config = {
      'architectures': [_LLAMA_ARCHITECTURES[cfg.family]], 'model_type': cfg.family, 'vocab_size': n,
      'hidden_size': cfg.n_embd, 'intermediate_size': cfg.intermediate_size, 'num_hidden_layers': cfg.n_layer,
      'num_attention_heads': cfg.n_head, 'num_key_value_heads': cfg.n_kv_head, 'head_dim': cfg.head_dim,
      'hidden_act': 'silu', 'max_position_embeddings': cfg.n_positions, 'rms_norm_eps': cfg.rms_norm_eps,
      'initializer_range': cfg.initializer_range, 'tie_word_embeddings': cfg.tie_word_embeddings,
      'attention_dropout': 0.0, 'use_cache': True, 'dtype': 'float32',
      # transformers 5 reads rope_parameters (rope_scaling first when set); older versions rope_theta + rope_scaling
      'rope_theta': cfg.rope_theta, 'rope_scaling': scaling,
      'rope_parameters': {'rope_type': 'default', **(scaling or {}), 'rope_theta': cfg.rope_theta},
  }
  if cfg.family == 'llama':
    config.update(attention_bias=cfg.o_bias, mlp_bias=cfg.mlp_bias)
  else:
    if cfg.o_bias or cfg.mlp_bias or not cfg.qkv_bias:
      raise ValueError('export_llama: Qwen2ForCausalLM has q/k/v biases only; this model has '
                       f'qkv_bias={cfg.qkv_bias}, o_bias={cfg.o_bias}, mlp_bias={cfg.mlp_bias}.')
    config.update(use_sliding_window=False, max_window_layers=cfg.n_layer)
  config.update(special_ids or {})
  with open(os.path.join(out_dir, 'config.json'), 'w') as f:
    json.dump(config, f, indent=2)
