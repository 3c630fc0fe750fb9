"""Dynamic Thinking Tokens in PyTorch, as transformers remote code: `python -m dtt_jax.export` copies this file into
every exported directory and names its class in `config.json`'s `auto_map`, so

    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    out = model.generate(**tokenizer(prompt, return_tensors='pt'), return_dict_in_generate=True)
    out.sequences, out.gates                                       # [B, P + N], [B, N]

decodes with the gate as dtt_jax does (`dtt_jax/model/dtt.py`, `dtt_jax/sampling/engine.py`; same names here).
Without `trust_remote_code` the directory loads as the plain trunk (GPT2LMHeadModel, LlamaForCausalLM,
Qwen2ForCausalLM): dtt_jax's decoding with the gate off. This file imports torch and transformers only.

The gate (`config.dtt['gate']`), computed in float32 at the evaluation temperature `config.dtt['tau']`, noise 0:

    'dtt':  g_t = sigmoid(gate_head(h_{t-1}) / tau),  x_t = g_t * P(h_{t-1}) + (1 - g_t) * E[y_t]
            (g_t = 1 where y_t is `config.dtt['pinned_id']` >= 0: `model.pin_latent`'s `<|latent|>`; with
            `config.dtt['pin_others']`, `model.pin_text`, g_t = 0 at every other token)
    'hrpo': p = softmax(lm_head(h_{t-1}) / tau), z = E^T p / |p|_2, e = E[y_t], r = sigmoid(gate_r(e)),
            i = sigmoid(gate_i(e)), a = sigmoid(lam)^(c r),  x_t = a e + sqrt(1 - a^2) (i z),  g_t = mean sqrt(1 - a^2)

h_{t-1} is the final hidden state (after the last norm) of the position before: the last prompt position's for the
first generated token. P is the projection (`config.dtt['use_projection']`; identity otherwise). The prompt runs as
the plain trunk; every generated token's input is blended, one position at a time against the KV cache
(`inputs_embeds` + `past_key_values` of the trunk). transformers' `generate` drives the loop (greedy, sampling,
logits processors, stopping criteria): each forward returns its final hidden states, which
`_update_model_kwargs_for_generation` hands to the next forward as `dtt_prev_hidden`. `generate(...,
max_think=k)` forces `<|eot|>` once the span after `<|bot|>` holds k tokens (dtt_jax's `GenerateConfig.max_think`).
Beam search and `use_cache=False` are refused (the recurrence needs one hidden state per row and the cache).

A forward call without `dtt_prev_hidden` (a prompt, or teacher-forced text) is the plain trunk.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from transformers import GPT2LMHeadModel, LlamaForCausalLM, LogitsProcessor, LogitsProcessorList, Qwen2ForCausalLM
from transformers.generation.utils import GenerateDecoderOnlyOutput
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import cached_file

DTT_HEAD_FILE = 'dtt_head.safetensors'
# dtt_head.safetensors name -> parameter name here
_HEAD_NAMES = {'gate.weight': 'gate_head.weight', 'gate.bias': 'gate_head.bias', 'hrpo.Lambda': 'hrpo.lam'}
_HUB_KWARGS = ('cache_dir', 'force_download', 'proxies', 'token', 'revision', 'local_files_only', 'subfolder')


def gumbel_sigmoid(logit: torch.Tensor, tau: float) -> torch.Tensor:
  """The gate at evaluation (noise 0): sigmoid(logit / tau), float32."""
  return torch.sigmoid(logit.float() / tau)


def blend(gate: torch.Tensor, latent: torch.Tensor, token_embedding: torch.Tensor) -> torch.Tensor:
  """gate [...], latent / token_embedding [..., D] -> g * latent + (1 - g) * embedding, [..., D]."""
  g = gate[..., None].to(token_embedding.dtype)
  return g * latent.to(token_embedding.dtype) + (1 - g) * token_embedding


def normalized_soft_embedding(logits: torch.Tensor, embedding: torch.Tensor, tau: float) -> torch.Tensor:
  """logits [..., V], embedding [V, D] -> E^T p / |p|_2 with p = softmax(logits / tau), [..., D] float32."""
  p = torch.softmax(logits.float() / tau, dim=-1)
  return (p @ embedding.float()) / torch.sqrt(torch.sum(p * p, dim=-1, keepdim=True))


class HRPOGate(nn.Module):
  """HRPO's thinking-residual gate: gate_r, gate_i (Linear D->D) and lam [D]."""

  def __init__(self, d: int, c: float):
    super().__init__()
    self.c = c
    self.gate_r, self.gate_i = nn.Linear(d, d), nn.Linear(d, d)
    self.lam = nn.Parameter(torch.zeros(d))

  def forward(self, token_embedding: torch.Tensor, latent: torch.Tensor):
    """e, z [..., D] -> (a e + sqrt(1 - a^2) (i z) [..., D] in e's dtype, gate mean_D sqrt(1 - a^2) [...])."""
    e = token_embedding.float()
    linear = lambda layer, x: nn.functional.linear(x, layer.weight.float(), layer.bias.float())
    r = torch.sigmoid(linear(self.gate_r, e))
    log_a = self.c * r * nn.functional.logsigmoid(self.lam.float())  # <= 0
    latent_weight = torch.sqrt(torch.clamp(-torch.expm1(2.0 * log_a), min=1e-12))  # sqrt(1 - a^2)
    i = torch.sigmoid(linear(self.gate_i, e))
    x = torch.exp(log_a) * e + latent_weight * (i * latent.float())
    return x.to(token_embedding.dtype), latent_weight.mean(-1)


class ForceEndOfThinking(LogitsProcessor):
  """dtt_jax's `max_think`: once the span after the first generated `<|bot|>` holds `max_think` tokens and has no
  `<|eot|>` yet, the next token is `<|eot|>`."""

  def __init__(self, prompt_len: int, bot_id: int, eot_id: int, max_think: int):
    self.prompt_len, self.bot_id, self.eot_id, self.max_think = prompt_len, bot_id, eot_id, max_think

  def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
    generated = input_ids[:, self.prompt_len:]  # [B, t]
    if generated.shape[1] == 0:
      return scores
    opened = torch.cumsum((generated == self.bot_id).long(), 1) > 0  # at or after the first <|bot|>
    closed = torch.cumsum(((generated == self.eot_id) & opened).long(), 1) > 0  # at or after its <|eot|>
    span_tokens = (opened & ~closed).sum(1) - 1  # the <|bot|> itself does not count
    force = opened[:, -1] & ~closed[:, -1] & (span_tokens >= self.max_think)
    forced = torch.full_like(scores, -float('inf'))
    forced[:, self.eot_id] = 0.0
    return torch.where(force[:, None], forced, scores)


@dataclasses.dataclass
class DTTCausalLMOutput(CausalLMOutputWithPast):
  """CausalLMOutputWithPast plus the final hidden states [B, T, D] (after the last norm) and, for a blended
  position, its gate [B, 1]."""

  last_hidden_state: torch.FloatTensor | None = None
  gates: torch.FloatTensor | None = None


@dataclasses.dataclass
class DTTGenerateOutput(GenerateDecoderOnlyOutput):
  """`generate`'s output plus gates [B, N]: the gate that blended each generated token's input (0 after a row's
  eos)."""

  gates: torch.FloatTensor | None = None


class DTTMixin:
  """The gate, the blended step and the generation loop over a transformers causal LM (`base_model`: the trunk,
  `lm_head`: its output layer)."""

  _keys_to_ignore_on_load_missing = [r'^gate_head\.', r'^proj\.', r'^hrpo\.']  # in dtt_head.safetensors

  def __init__(self, config):
    super().__init__(config)
    dtt, d = config.dtt, config.hidden_size
    if dtt['gate'] not in ('dtt', 'hrpo'):
      raise ValueError(f"config.json dtt.gate={dtt['gate']!r}: expected 'dtt' or 'hrpo'.")
    self.tau = float(dtt['tau'])
    self.pinned_id = int(dtt.get('pinned_id', -1))
    self.pin_others = bool(dtt.get('pin_others', False))  # with pinned_id: every other token's gate is 0
    self.gate_head = nn.Linear(d, 1) if dtt['gate'] == 'dtt' else None
    self.proj = nn.Linear(d, d) if dtt.get('use_projection') else None
    self.hrpo = HRPOGate(d, float(dtt['hrpo_c'])) if dtt['gate'] == 'hrpo' else None
    self._dtt_hiddens = None  # during `generate`: h_{t-1} of every generated position, [B, D] each

  @classmethod
  def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
    """The trunk as transformers loads it, then the gate's parameters from dtt_head.safetensors."""
    loaded = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
    model = loaded[0] if isinstance(loaded, tuple) else loaded
    path = cached_file(pretrained_model_name_or_path, DTT_HEAD_FILE,
                       **{k: kwargs[k] for k in _HUB_KWARGS if k in kwargs})
    model.load_dtt_head(path)
    return loaded

  def load_dtt_head(self, path: str) -> None:
    from safetensors.torch import load_file  # pylint: disable=g-import-not-at-top
    tensors = {_HEAD_NAMES.get(k, k): v for k, v in load_file(path).items()}
    head = {k: v for k, v in self.state_dict().items() if k.split('.')[0] in ('gate_head', 'proj', 'hrpo')}
    if set(tensors) != set(head):
      raise ValueError(f'{path} holds {sorted(tensors)}, but config.json dtt={self.config.dtt} needs {sorted(head)}.')
    with torch.no_grad():
      for name, value in tensors.items():
        self.get_parameter(name).copy_(value)

  def gate_logit(self, hidden: torch.Tensor) -> torch.Tensor:
    """hidden [..., D] -> gate logit [...] float32."""
    return nn.functional.linear(hidden.float(), self.gate_head.weight.float(), self.gate_head.bias.float())[..., 0]

  def project(self, hidden: torch.Tensor) -> torch.Tensor:
    return hidden if self.proj is None else self.proj(hidden)

  def blend_embedding(self, prev_hidden: torch.Tensor, tokens: torch.LongTensor):
    """prev_hidden [..., D], tokens [...] -> (blended input [..., D], gate [...])."""
    token_embedding = self.get_input_embeddings()(tokens)
    if self.hrpo is not None:
      latent = normalized_soft_embedding(self.lm_head(prev_hidden), self.get_input_embeddings().weight, self.tau)
      return self.hrpo(token_embedding, latent)
    gate = gumbel_sigmoid(self.gate_logit(prev_hidden), self.tau)
    if self.pinned_id >= 0:
      gate = torch.where(tokens == self.pinned_id, 1.0, torch.zeros_like(gate) if self.pin_others else gate)
    return blend(gate, self.project(prev_hidden), token_embedding), gate

  def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, inputs_embeds=None,
              labels=None, use_cache=None, logits_to_keep=0, dtt_prev_hidden=None, **kwargs) -> DTTCausalLMOutput:
    """The trunk on `input_ids` (or `inputs_embeds`); with `dtt_prev_hidden` [B, D] (one generated position,
    input_ids [B, 1]) its input is the blend of the token's embedding with it."""
    gates = None
    if dtt_prev_hidden is not None:
      if input_ids is None or input_ids.shape[1] != 1:
        raise ValueError('dtt_prev_hidden blends one position: pass input_ids of shape [B, 1].')
      inputs_embeds, gates = self.blend_embedding(dtt_prev_hidden[:, None], input_ids)
      input_ids = None
    outputs = self.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                              **kwargs)
    hidden = outputs.last_hidden_state  # [B, T, D]
    keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
    logits = self.lm_head(hidden[:, keep])
    loss = None
    if labels is not None:
      loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
    return DTTCausalLMOutput(loss=loss, logits=logits, past_key_values=outputs.past_key_values,
                             last_hidden_state=hidden, gates=gates)

  def _update_model_kwargs_for_generation(self, outputs, model_kwargs, *args, **kwargs):
    model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, *args, **kwargs)
    model_kwargs['dtt_prev_hidden'] = outputs.last_hidden_state[:, -1]  # h_{t-1} of the next position
    if self._dtt_hiddens is not None:
      self._dtt_hiddens.append(model_kwargs['dtt_prev_hidden'])
    return model_kwargs

  def generate(self, inputs=None, generation_config=None, logits_processor=None, max_think: int = 0, **kwargs):
    """transformers' `generate` with every generated token's input blended (module docstring); `max_think` > 0
    forces `<|eot|>` after that many span tokens. With `return_dict_in_generate=True` the output also has `gates`
    [B, N], the gate of each generated token's input."""
    config = generation_config or self.generation_config
    if (kwargs.get('num_beams') or config.num_beams or 1) != 1 or kwargs.get('use_cache', config.use_cache) is False:
      raise ValueError('DTT decoding is greedy or sampled with the KV cache: num_beams=1, use_cache=True.')
    prompt = inputs if inputs is not None else kwargs.get('input_ids')
    prompt_len = 0 if prompt is None else prompt.shape[1]  # inputs_embeds alone: sequences hold the new tokens
    processors = LogitsProcessorList(logits_processor or [])
    if max_think > 0:
      processors.append(ForceEndOfThinking(prompt_len, self.config.dtt['bot_id'], self.config.dtt['eot_id'],
                                           max_think))
    self._dtt_hiddens = []
    try:
      out = super().generate(inputs, generation_config, logits_processor=processors, **kwargs)
      hiddens = self._dtt_hiddens
    finally:
      self._dtt_hiddens = None
    sequences = out if isinstance(out, torch.Tensor) else out.sequences
    if not isinstance(out, torch.Tensor) and kwargs.get('return_dict_in_generate', config.return_dict_in_generate):
      return DTTGenerateOutput(**out, gates=self.generated_gates(sequences[:, prompt_len:], hiddens))
    return out

  def generated_gates(self, new_tokens: torch.LongTensor, hiddens: list[torch.Tensor]) -> torch.Tensor:
    """new_tokens [B, N], hiddens: h_{t-1} for t = 0.. -> gates [B, N] of their inputs, 0 after each row's eos."""
    n = new_tokens.shape[1]
    with torch.no_grad():
      _, gates = self.blend_embedding(torch.stack(hiddens[:n], 1), new_tokens)
    eos = self.generation_config.eos_token_id
    eos = torch.tensor(eos if isinstance(eos, list) else [eos], device=new_tokens.device)
    ended = torch.isin(new_tokens, eos).long().cumsum(1)  # counts eos at and before each position
    after_eos = (ended - torch.isin(new_tokens, eos).long()) > 0
    return gates.masked_fill(after_eos, 0.0)


class DTTGPT2ForCausalLM(DTTMixin, GPT2LMHeadModel):
  pass


class DTTLlamaForCausalLM(DTTMixin, LlamaForCausalLM):
  pass


class DTTQwen2ForCausalLM(DTTMixin, Qwen2ForCausalLM):
  pass
