"""Export a trained DTT model as a Hugging Face directory that transformers loads as is: GPT-2, or the Llama /
Qwen2 checkpoint of a Llama-family run (`hf_io.export_llama`: LlamaForCausalLM / Qwen2ForCausalLM, with the run's
tokenizer: the checkpoint's own with the 4 DTT specials last, or GPT-2's).

    python -m dtt_jax.export --workdir=runs/gsm8k --out=exported/gsm8k [--stage=grpo|bootstrap]

Writes `config.json` + `model.safetensors` (loads with `transformers.AutoModelForCausalLM.from_pretrained(out)`;
bos/eos/pad ids are the model's <|endoftext|> row), the tokenizer (`tokenizer.json` + `tokenizer_config.json`:
`AutoTokenizer.from_pretrained(out)`, ids = the model's ids, the 4 DTT specials as special tokens; see
`tokens.hf_tokenizer_for_vocab`), `dtt_head.safetensors` (gate head `gate.weight` [1,D] / `gate.bias` [1], and
`proj.weight`/`proj.bias` when the projection is used, in PyTorch Linear layout; the HRPO gate's `hrpo.*` tensors
with `config.model.gate='hrpo'`), `dtt_config.json` (gate kind and formula, evaluation temperature) and
`dtt_vocab.json`. LoRA adapters are merged into the exported weights. With the full vocabulary the token ids
are the tokenizer's: GPT-2's (plus the 4 DTT specials at 50257..50260), or a checkpoint tokenizer's (the specials
after its vocabulary; config.json's bos / eos / pad ids its own, `Tokenizer.export_special_ids`). With the
compact vocabulary the exported rows and the tokenizer's ids are the model ids (`dtt_vocab.json` lists the GPT-2
id of each row): the dataset's text tokenizes to exactly the ids dtt_jax gives it; text with tokens outside the
compact vocabulary gets ids >= vocab_size, which the model cannot embed (dtt_jax's tokenizer refuses such text
too).

The directory also carries the method as transformers remote code: `modeling_dtt.py` (a copy of
`model/modeling_dtt.py`: the gate, the projection and the latent generation loop in PyTorch), named by config.json's
`auto_map` with the gate's settings in its `dtt` entry, so `AutoModelForCausalLM.from_pretrained(out,
trust_remote_code=True)` and its `generate` decode with the gate as dtt_jax does (GPT-2, Llama, Qwen2; the DTT and
HRPO gates). Loaded without `trust_remote_code` it is the plain trunk: dtt_jax's decoding with the gate off.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
from absl import app, flags

from dtt_jax import pipeline, tokens
from dtt_jax.methods import base, dtt as dtt_method
from dtt_jax.model import hf_io

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Workdir of a training run.')
flags.DEFINE_string('out', None, 'Output directory for the HF checkpoint.')
flags.DEFINE_string('stage', '', "'grpo' or 'bootstrap' ('' = the newest finished stage).")
flags.mark_flags_as_required(['workdir', 'out'])


REMOTE_CODE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'model', 'modeling_dtt.py')
REMOTE_CLASSES = {'gpt2': 'DTTGPT2ForCausalLM', 'llama': 'DTTLlamaForCausalLM', 'qwen2': 'DTTQwen2ForCausalLM'}
BLENDS = {
    'dtt': 'x_t = g*P(h_{t-1}) + (1-g)*E[y_t], g = sigmoid((gate(h_{t-1}) + noise) / tau)',
    'hrpo': 'x_t = a*e + sqrt(1-a^2)*(i*z), e = E[y_t], a = sigmoid(Lambda)^(c*r), r = sigmoid(gate_r(e)), '
            'i = sigmoid(gate_i(e)), z = E^T p / |p|_2, p = softmax(logits(h_{t-1}) / tau)',
}


def gate_tensors(model) -> dict[str, np.ndarray]:
  """The gate's parameters in PyTorch Linear layout ([out, in] weights): `gate.*` and `proj.*` (DTT gate) or
  `hrpo.gate_r.*`, `hrpo.gate_i.*`, `hrpo.Lambda` [D] (HRPO gate)."""
  linears = {'gate': model.gate_head, 'proj': model.proj}
  if model.hrpo is not None:
    linears = {'hrpo.gate_r': model.hrpo.gate_r, 'hrpo.gate_i': model.hrpo.gate_i}
  out = {}
  for name, linear in linears.items():
    if linear is not None:
      out[f'{name}.weight'] = np.asarray(linear.kernel[...]).T
      out[f'{name}.bias'] = np.asarray(linear.bias[...])
  if model.hrpo is not None:
    out['hrpo.Lambda'] = np.asarray(model.hrpo.lam[...])
  return out


def write_export(model, tokenizer: tokens.Tokenizer, out_dir: str, stage: str, eval_tau: float,
                 pinned_id: int = -1, pin_others: bool = False) -> None:
  """Writes the HF directory of `model` (a `DTTModel` whose rows are `tokenizer.vocab`'s model ids); `pinned_id`:
  the token whose gate is 1 (`config.model.pin_latent`: `<|latent|>`), -1 for none; `pin_others`: every other
  token's gate 0 (`config.model.pin_text`)."""
  vocab = tokenizer.vocab
  if model.gpt2.cfg.family == 'gpt2':  # LoRA adapters merged into the base by either exporter
    hf_io.export_pretrained(model.gpt2, out_dir, eos_id=vocab.eos)
  else:
    hf_io.export_llama(model.gpt2, out_dir, special_ids=tokenizer.export_special_ids())
  tokens.hf_tokenizer_for_vocab(tokenizer.hf, vocab, model.gpt2.cfg.n_positions).save_pretrained(out_dir)
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  save_file({k: np.ascontiguousarray(v, np.float32) for k, v in gate_tensors(model).items()},
            os.path.join(out_dir, 'dtt_head.safetensors'))
  gate = {'gate': model.cfg.gate, 'use_projection': model.proj is not None, 'blend': BLENDS[model.cfg.gate]}
  if model.hrpo is not None:
    gate['hrpo_c'] = model.hrpo.c
  with open(os.path.join(out_dir, 'dtt_config.json'), 'w') as f:
    json.dump({'stage': stage, 'eval_tau': eval_tau, **gate,
               'special_tokens': {name: vocab.model_id(gid) for name, gid in zip(
                   (tokenizer.hf.eos_token,) + tokens.SPECIAL_TOKENS, vocab.special_ids)}}, f, indent=2)
  with open(os.path.join(out_dir, 'dtt_vocab.json'), 'w') as f:
    f.write(vocab.to_json())
  write_remote_code(out_dir, model.gpt2.cfg.family, {
      'gate': model.cfg.gate, 'use_projection': model.proj is not None, 'tau': eval_tau,
      'hrpo_c': model.hrpo.c if model.hrpo is not None else None, 'bot_id': vocab.bot, 'eot_id': vocab.eot,
      'latent_id': vocab.latent, 'pause_id': vocab.pause, 'pinned_id': pinned_id, 'pin_others': pin_others})


def write_remote_code(out_dir: str, family: str, dtt: dict) -> None:
  """Copies `model/modeling_dtt.py` into out_dir and names its class for `family` in config.json's `auto_map`, with
  the gate's settings as `config.json`'s `dtt` (read by `AutoModelForCausalLM.from_pretrained(out_dir,
  trust_remote_code=True)`; without it transformers ignores both)."""
  shutil.copyfile(REMOTE_CODE, os.path.join(out_dir, 'modeling_dtt.py'))
  path = os.path.join(out_dir, 'config.json')
  with open(path) as f:
    config = json.load(f)
  config.update(auto_map={'AutoModelForCausalLM': f'modeling_dtt.{REMOTE_CLASSES[family]}'}, dtt=dtt)
  with open(path, 'w') as f:
    json.dump(config, f, indent=2)


def export(workdir: str, out_dir: str, stage: str = '') -> str:
  """Writes the HF directory for `stage`'s best checkpoint; returns the stage exported."""
  exp = pipeline.open_workdir(workdir)
  if not stage:
    stage = 'grpo' if os.path.isdir(os.path.join(workdir, 'grpo', 'checkpoints')) else 'bootstrap'
  graphdef, params = base.stage_params(exp, stage)
  from flax import nnx  # pylint: disable=g-import-not-at-top
  write_export(nnx.merge(graphdef, params), exp.tokenizer, out_dir, stage, exp.config[stage].tau_min,
               dtt_method.pinned_id(exp.config, exp.vocab), exp.config.model.pin_text)
  return stage


def main(argv):
  del argv
  stage = export(FLAGS.workdir, FLAGS.out, FLAGS.stage)
  print(f'Exported the {stage} model of {FLAGS.workdir} to {FLAGS.out}')


if __name__ == '__main__':
  app.run(main)
