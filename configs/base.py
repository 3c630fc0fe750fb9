"""Every knob of dtt_jax with its default. Dataset configs override a few fields; the command line overrides any
(`--config.bootstrap.steps=200`). Nothing reads hyperparameters from anywhere else.

`python -m dtt_jax.main --config=configs/<dataset>.py[:stage] --workdir=DIR`
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.stage = 'pipeline'  # 'bootstrap' | 'grpo' | 'eval' | 'pipeline' (bootstrap, then grpo, then eval)
  # 'dtt' (gated latent blend, bootstrap + GRPO); COCONUT and its baselines (config.coconut): 'coconut',
  # 'pause_as_thought', 'cot', 'no_cot', 'pause', 'coconut_no_thought', 'icot'; 'think_tokens' (learned
  # thinking-token vocabulary, config.think)
  c.method = 'dtt'
  c.num_devices = 0  # 0: every device of every process
  c.parallel = ml_collections.ConfigDict()
  # The mesh is (num_devices // fsdp) 'data' x fsdp 'fsdp': parameters, gradients and optimizer state are split
  # fsdp ways (dtt_jax/parallel.py has the rule table), batches num_devices ways. 1: replicated (data parallel)
  c.parallel.fsdp = 1
  # A workdir whose bootstrap result starts the first stage this run trains: a COCONUT method's or DTT's bootstrap
  # (e.g. from a CoT run), or with --config.stage=grpo GRPO's policy and reference ('': from scratch / this workdir)
  c.init_from = ''
  c.init_checkpoint = 'best'  # which bootstrap checkpoint of init_from: 'best' (by its validation), 'latest' or a step
  # A rerun whose config differs from the checkpoints in the workdir beyond steps / intervals / logging:
  # 'stop' (an error listing the differences) | 'move_aside' (old stages to <workdir>/moved-<time>/, start anew)
  c.on_config_change = 'stop'
  c.dry_run = False  # True: report per-device memory and the steps' FLOPs, then exit (dtt_jax/dry_run.py)

  c.wandb = ml_collections.ConfigDict()
  c.wandb.enabled = False  # also log to Weights & Biases
  c.wandb.mode = 'offline'  # 'online' | 'offline' (no network needed; `wandb sync` later)
  c.wandb.project = 'dtt_jax'
  c.wandb.name = ''

  c.dataset = ml_collections.ConfigDict()
  c.dataset.name = 'addition'  # 'gsm8k' | 'prosqa' | 'prontoqa' | 'addition' | 'prosqa_mini'
  c.dataset.train_path = ''  # '' = the default location (or the generator for addition / prosqa train)
  c.dataset.valid_path = ''
  c.dataset.test_path = ''  # read by the eval stage with config.eval.split='test'
  c.dataset.data_dir = ''  # '' = ../shared/data beside the project if present
  c.dataset.train_size = 20000  # generated datasets only
  c.dataset.valid_size = 256  # held-out examples used for validation (SPEC: 256)
  c.dataset.min_digits = 2  # addition generator
  c.dataset.max_digits = 4
  c.dataset.prosqa_nodes = 6  # prosqa_mini generator: N of ProsQA's Algorithm 1 (graph nodes before isolated ones go)
  c.dataset.prosqa_min_path = 2  # prosqa_mini generator: shortest root -> answer path, in steps

  c.model = ml_collections.ConfigDict()
  # 'scratch', a hub name ('gpt2') or a local HF directory (GPT-2, Llama or Qwen2: the family from its config.json;
  # a Llama-family checkpoint with a tokenizer of its own brings it: hf_io.tokenizer_source, README)
  c.model.init = 'scratch'
  c.model.family = 'gpt2'  # init='scratch' only: 'gpt2' | 'llama' | 'qwen2' (Llama + q/k/v biases); model/llama.py
  c.model.vocab = 'compact'  # 'compact' (ids used by the data + specials; for scratch models) | 'full'
  c.model.tokenizer = ''  # '' = a Llama-family init's own, else ../shared/data/gpt2_tokenizer if present, else 'gpt2'
  c.model.n_layer = 2
  c.model.n_embd = 128
  c.model.n_head = 4
  c.model.n_positions = 256
  # Scratch Llama / Qwen2 only (head_dim = n_embd / n_head, RMSNorm, RoPE, SwiGLU MLP):
  c.model.n_kv_head = 0  # key/value heads, a divisor of n_head (grouped-query attention); 0: n_head
  c.model.intermediate_size = 0  # SwiGLU MLP width; 0: 4 * n_embd
  c.model.rope_theta = 10000.0
  c.model.tie_word_embeddings = True  # False: a separate output layer `lm_head` (GPT-2 is always tied)
  c.model.dtype = 'float32'  # compute dtype of matmuls / attention: 'bfloat16' on accelerators (softmax, norms, loss,
  # log-probs and the gate stay float32)
  c.model.vocab_size = 0  # dry_run of a hub checkpoint not on this machine: its tokenizer's size (0: GPT-2's)
  c.model.param_dtype = 'float32'  # stored parameters: float32 master weights; 'bfloat16' for inference only
  # Rematerialization of the trunk's blocks in training (dtt_jax/model/blocks.py): 'none' (keep every intermediate),
  # 'block' (keep each block's input, recompute the rest: ~4/3 the FLOPs) | 'dots' (keep matmul outputs too). With
  # it on, the GRPO step gathers FSDP-sharded weights one layer at a time. Same numbers in every mode.
  c.model.remat = 'none'
  c.model.gate_bias_init = -4.0  # gate sigmoid(-4 / tau) starts near 0 (0.12 at tau0 = 2, 0.02 at tau = 1)
  c.model.use_projection = False
  c.model.gate = 'dtt'  # 'dtt' (Gumbel-sigmoid gate head) | 'hrpo' (HRPO's thinking-residual gate; model/dtt.py)
  # True: the gate is 1 at `<|latent|>` positions (their input is the previous hidden state, a continuous thought),
  # the gate head decides elsewhere (the compressing DTT; model/dtt.py pin_noise)
  c.model.pin_latent = False
  # True (with pin_latent): the gate is 0 at every other token (its input exactly the token's embedding), so the model
  # computes COCONUT's inputs and its gate head is unused (an ablation of DTT's gate: docs/study_notes.md)
  c.model.pin_text = False
  c.model.hrpo_c = 8.0  # HRPO gate: a = sigmoid(lam)^(c * r)
  c.model.hrpo_a_init = (0.99, 0.999)  # HRPO gate: initial a over the D dimensions (input starts as the token)
  # GPT-2's training-mode dropout (embedding, attention probabilities, residual branches) in the supervised steps
  # (DTT's bootstrap, COCONUT and its baselines); GRPO, validation and evaluation run without
  c.model.dropout = 0.0

  # LoRA adapters (dtt_jax/model/lora.py). Enabled: adapters, gate and train_modules train, the rest is frozen. For
  # --config.stage=grpo --config.init_from=<full bootstrap>, fresh adapters go on the bootstrap's weights.
  c.lora = ml_collections.ConfigDict()
  c.lora.enabled = False
  c.lora.rank = 8
  c.lora.alpha = 16.0  # adapter output scaled by alpha / rank
  # Per block, the trunk family's projections: GPT-2 any of these; Llama / Qwen2 any of 'self_attn.q_proj',
  # 'self_attn.k_proj', 'self_attn.v_proj', 'self_attn.o_proj', 'mlp.gate_proj', 'mlp.up_proj', 'mlp.down_proj'
  c.lora.targets = ('attn.c_attn', 'attn.c_proj', 'mlp.c_fc', 'mlp.c_proj')
  # Trained fully besides adapters and gate (PEFT's modules_to_save), any of 'wte', 'wpe', 'ln_1', 'ln_2', 'ln_f'
  # (Llama / Qwen2: 'wte', 'lm_head', 'input_layernorm', 'post_attention_layernorm', 'norm').
  # 'wte' is the tied embedding and output layer: the DTT special tokens start as copies of one pretrained row, so
  # with it frozen <|bot|>, <|eot|> and that token always get identical logits. () trains adapters and gate only.
  c.lora.train_modules = ('wte',)

  c.data = ml_collections.ConfigDict()
  c.data.max_prompt_len = 32
  c.data.max_completion_len = 32
  c.data.span = 'none'  # 'none': empty span, random filler in filler_prob of samples | 'cot': dataset steps
  c.data.filler_prob = 0.15
  c.data.max_filler = 8
  # span = 'cot', generated addition: 'steps' (the record's steps) | 'answer_digits' | 'column_digits' (data/samples.py)
  c.data.span_text = 'steps'
  c.data.digit_tokens = False  # span and answer one token per digit (GPT-2's single-digit ids)

  c.bootstrap = ml_collections.ConfigDict()
  c.bootstrap.steps = 1000
  c.bootstrap.batch_size = 32  # global (effective) batch, kept constant on any device count
  c.bootstrap.microbatches = 1  # gradient accumulation inside the step: batch_size / microbatches per pass
  # The optimizer of every supervised method (DTT's bootstrap, COCONUT and its baselines): AdamW, its schedule
  # 'warmup_cosine' (linear warmup, cosine decay to lr / 10 over the stage, or between two coconut resets) |
  # 'constant' (COCONUT's run.py); weight decay on 'matrices' (kernels, embeddings) | 'all' parameters (PyTorch's
  # AdamW(model.parameters())); global-norm clipping at grad_clip (0: none)
  c.bootstrap.lr = 1e-3
  c.bootstrap.schedule = 'warmup_cosine'
  c.bootstrap.gate_lr_mult = 1.0  # learning rate of gate head / projection = lr * this
  c.bootstrap.warmup_steps = 50
  c.bootstrap.weight_decay = 0.01
  c.bootstrap.decay = 'matrices'
  c.bootstrap.grad_clip = 1.0
  c.bootstrap.hinge_lambda = 0.1  # SPEC default; tiny from-scratch models need ~1.0 (see configs/quickstart.py)
  c.bootstrap.m_in = 0.9
  c.bootstrap.m_out = 0.1
  c.bootstrap.noisy_span_scale = 0.3  # attention to injected filler keys is scaled by this (log added to logits)
  c.bootstrap.gate_noise = True
  c.bootstrap.hard_gate = False
  c.bootstrap.tau0 = 2.0
  c.bootstrap.tau_min = 0.1
  c.bootstrap.patience = 3
  c.bootstrap.eval_every = 200
  c.bootstrap.checkpoint_every = 200
  c.bootstrap.keep_checkpoints = 2
  c.bootstrap.log_every = 20
  c.bootstrap.best_metric = 'structure_rate'  # validation metric of the temperature plateau rule (SPEC §6)
  # Validation metrics, '+'-joined and summed, that rank checkpoints for 'best' (ties: the later step)
  c.bootstrap.best_checkpoint = 'accuracy+structure_rate'

  # COCONUT and its baselines (config.method in data/coconut.py METHODS; dtt_jax/train/coconut.py), trained by the
  # bootstrap stage's loop with config.bootstrap's lr, weight_decay and batch; an epoch is `steps_per_epoch` steps.
  # Budget: config.bootstrap.steps when > 0, else the epochs below (the COCONUT configs set bootstrap.steps = 0); a
  # curriculum run whose budget ends before the final stage is a config error. config.init_from: a workdir whose
  # bootstrap result (best by validation, e.g. a CoT run) gives the initial weights (COCONUT's load_model_path).
  c.coconut = ml_collections.ConfigDict()
  c.coconut.c_thoughts = 1  # continuous thoughts per replaced step (paper: 1 on ProsQA/ProntoQA, 2 on GSM8K)
  c.coconut.max_stage = 6  # K: stages 0..K replace the first k steps, then one stage with every step latent
  c.coconut.epochs_per_stage = 5
  c.coconut.first_stage_epochs = 0  # epochs of stage 0 (text CoT) when it needs longer than the others; 0: as they
  c.coconut.curriculum = True  # False: COCONUT "w/o curriculum", every step at the final stage
  c.coconut.steps_per_epoch = 0  # 0: one pass over the training records
  c.coconut.num_epochs = 0  # epochs of the schedule (COCONUT's num_epochs); 0: (max_stage + 2) * epochs_per_stage
  c.coconut.start_epoch = 0  # the run starts at this epoch (COCONUT's resume: GSM8K 3, from a CoT run's weights)
  # Fresh optimizer state (config.bootstrap's optimizer) every 'epoch' (COCONUT's run.py), every 'stage' (a
  # warmup_cosine schedule then spans one stage) or 'never', at the same steps for every method of the comparison
  c.coconut.reset_optimizer = 'epoch'
  c.coconut.eval_every_epochs = 0  # > 0: validate + checkpoint every this many epochs (COCONUT: 1); 0: bootstrap's
  # iCoT (config.method='icot'; official da03/Internalize_CoT_Step_by_Step train.py): CoT tokens removed from the
  # front per epoch, one every round(steps_per_epoch / icot_delta) steps (--remove_per_epoch); removal smoothing
  # lambda, P(extra o) ~ exp(-lambda o) (--removal_smoothing_lambda; inf: none); epochs before the removal starts
  # (--pretrain_epochs); every token removed once this many are (--remove_all_when_remove_beyond; 0: never). The
  # optimizer resets where the removal count grows (with coconut.reset_optimizer).
  c.coconut.icot_delta = 8.0
  c.coconut.icot_lambda = 4.0
  c.coconut.icot_pretrain_epochs = 0
  c.coconut.icot_remove_all_beyond = 0
  # The compressing DTT (config.data.span='curriculum'): stage k replaces the first k steps by <|latent|> positions,
  # COCONUT's k * c_thoughts (0), or ceil(m / this) for a step of m tokens (> 0)
  c.coconut.tokens_per_latent = 0
  # False: the latents are no targets and decoding forces <|bot|> and the stage's latents (COCONUT's head);
  # True: the latents are targets and the model emits them itself (a count of its own choosing)
  c.coconut.latent_targets = False
  # True: from stage K on, each training row's latent count is uniform in [0, K * c_thoughts] (decoding still forces
  # K * c_thoughts, or eval.budget), so the model answers at any budget
  c.coconut.latent_jitter = False
  # Where the compressing DTT's remaining text steps go: 'gated' (in the span, gate hinged towards 1), 'embedded' (in
  # the span, gate towards 0: token embeddings), 'after_eot' (after the span, as COCONUT lays them out)
  c.coconut.span_text = 'gated'
  # The hinge pushes the latents' gate towards 1 at every stage ('always') or before the final stage only
  # ('before_final': in the final stage the cross-entropy alone sets it)
  c.coconut.latent_hinge = 'always'

  # Thinking-token vocabulary (config.method='think_tokens', dtt_jax/methods/think_tokens/)
  c.think = ml_collections.ConfigDict()
  c.think.num_tokens = 8  # K extra vocabulary rows <think_0> ... <think_{K-1}>
  c.think.mode = 'teacher'  # 'teacher' (frozen teacher's log-likelihood of the real tokens) | 'next_token'
  c.think.with_steps = True  # text of a record: question, its reasoning steps, answer (False: question, answer)
  c.think.max_len = 0  # tokens per text sequence (longer records are dropped); 0: the longest record
  c.think.cut = 'text'  # where rollout prefixes end: 'text' (anywhere) | 'answer' (before an answer token)
  c.think.teacher_steps = 500  # teacher stage: next-token CE steps from model.init (0: use model.init as is)
  c.think.teacher_lr = 1e-3
  c.think.batch_size = 32  # teacher stage: text sequences per step (global)
  c.think.steps = 100  # thinking stage: GRPO rollout batches
  c.think.prompts_per_step = 8  # text prefixes per rollout batch (global; divisible by the device count)
  c.think.num_generations = 8  # G rollouts per prefix (one group)
  c.think.lr = 1e-4  # thinking stage learning rate of the original parameters
  c.think.rows_lr_mult = 10.0  # learning rate of think_in / think_out / think_bias = lr * this
  c.think.train = 'all'  # 'all' | 'rows' (only the thinking rows train; the teacher's weights stay frozen)
  c.think.real_tokens = 4  # teacher mode: a rollout continues its prefix by this many real tokens (or to eos)
  c.think.max_think = 3  # at most this many consecutive thinking tokens, then a real token is forced
  c.think.init_prob = 0.1  # think_bias at init: total thinking probability at the median training position
  c.think.temperature = 1.0  # sampling temperature of rollouts and of the evaluation's thinking decisions
  c.think.beta = 0.01  # k3 KL to the initial policy (teacher + fresh thinking rows; 0: none)
  c.think.clip_eps = 0.2  # PPO clip
  c.think.mu = 1  # optimizer updates per rollout batch
  c.think.loss_agg = 'grpo'  # 'grpo' | 'dapo' | 'dr_grpo' (dtt_jax/rl/grpo.py)
  c.think.ce_weight = 1.0  # next_token mode: + this * CE of the true next token after the thoughts
  c.think.warmup_steps = 10  # both stages
  c.think.weight_decay = 0.0  # both stages
  c.think.grad_clip = 1.0  # both stages
  c.think.eval_size = 64  # validation sequences of the evaluation (and of the periodic validation)
  c.think.eval_every = 50  # both stages
  c.think.checkpoint_every = 100  # both stages
  c.think.keep_checkpoints = 2
  c.think.log_every = 10

  c.generate = ml_collections.ConfigDict()  # validation / evaluation decoding
  c.generate.max_new_tokens = 32
  c.generate.max_think = 16  # reasoning budget: <|eot|> forced after this many span tokens (0: none)
  c.generate.batch_size = 64

  c.grpo = ml_collections.ConfigDict()  # Stage 2 (SPEC §7); see dtt_jax/rl/grpo.py
  c.grpo.steps = 200  # rollout batches (each followed by `mu` optimizer updates)
  c.grpo.prompts_per_step = 8  # B, global; divisible by the number of devices (a group never spans devices)
  c.grpo.num_generations = 8  # G completions per prompt
  c.grpo.lr = 1e-4
  c.grpo.gate_lr_mult = 1.0  # learning rate of gate head / projection = lr * this
  c.grpo.warmup_steps = 10
  c.grpo.weight_decay = 0.0
  c.grpo.grad_clip = 1.0
  c.grpo.beta = 0.04  # k3 KL to the frozen Stage-1 reference (0: no reference pass)
  c.grpo.clip_eps = 0.2
  c.grpo.mu = 1  # inner iterations (optimizer updates) per rollout batch, inside the jitted step
  # Gradient accumulation: each update sums this many passes over (prompts_per_step x num_generations) / microbatches
  # completions (divides the completions per device); the same update as one pass, less activation memory
  c.grpo.microbatches = 1
  c.grpo.loss_agg = 'grpo'  # 'grpo' (per-sequence token mean) | 'dapo' (token mean) | 'dr_grpo' (sum / (N * T))
  c.grpo.scale_rewards = 'group'  # advantage divisor: 'group' std (SPEC §7) | 'batch' std | 'none' (Dr. GRPO)
  c.grpo.score_blended_tokens = True  # False: no policy-gradient term at inner tokens with gate >= 0.5
  c.grpo.drop_zero_std_groups = False  # exclude groups whose rewards are all equal from the loss (always counted)
  c.grpo.gate_as_action = False  # the gate sample's binary-concrete log-density joins the PPO ratio
  c.grpo.temperature = 1.0  # sampling temperature of rollouts (re-scoring uses the same)
  c.grpo.top_k = 0
  c.grpo.top_p = 1.0
  c.grpo.max_new_tokens = 32
  c.grpo.max_think = 16  # reasoning budget in rollouts (0: none); forced <|eot|> tokens carry no loss
  c.grpo.gate_noise = True  # Gumbel noise on the gate in rollouts
  c.grpo.hard_gate = False
  c.grpo.fused_logprobs = True  # output layer + log-softmax in tiles, never the [N,T,V] logits (2x faster on CPU)
  c.grpo.rescore = 'parallel'  # 'parallel' (SPEC §7, no gradient through fed-back hidden states) | 'recurrent'
  c.grpo.tau0 = 1.0  # gate temperature schedule of the stage (SPEC §6)
  c.grpo.tau_min = 0.1
  c.grpo.patience = 3
  c.grpo.reward_weights = ml_collections.ConfigDict(dict(structure=1.0, correctness=1.0, efficiency=1.0, gate=1.0))
  # The efficiency term: 'flat' (-0.01 per reasoning position, the seed's) | 'group' (Kimi k1.5: +0.5 for the
  # shortest correct completion of a group down to -0.5 for the longest, never positive for a wrong one)
  c.grpo.length_reward = 'flat'
  c.grpo.min_think = 0  # > 0: each rollout's reasoning budget drawn uniformly from [min_think, max_think]
  c.grpo.eval_every = 50  # validation: mean reward on dataset.valid_size held-out prompts
  c.grpo.checkpoint_every = 50
  c.grpo.keep_checkpoints = 2
  c.grpo.log_every = 5
  c.grpo.best_metric = 'reward'
  c.grpo.best_checkpoint = 'accuracy+reward'

  # The eval stage (dtt_jax/eval/run.py): greedy decoding of each trained stage on a split or a file; reports in
  # <workdir>/eval/<split or file name>/<stage>/ with one row per example (its id: a hash of the question).
  c.eval = ml_collections.ConfigDict()
  c.eval.split = 'valid'  # 'valid' | 'test' (generated addition: every problem of the test bucket)
  c.eval.path = ''  # a file in the dataset's formats, evaluated instead of the split
  c.eval.size = 0  # the first N distinct examples (0: all; the generated valid split has dataset.valid_size)
  c.eval.checkpoint = 'best'  # 'best' (by <stage>.best_checkpoint) | 'latest' | a step number
  # How an answer is scored (validation, evaluation, GRPO's correctness reward): 'lenient' (the per-dataset rules of
  # data/answers.py, SPEC §8) | 'exact' (COCONUT's: the answer text, commas removed and stripped, equals the
  # reference). The answer is the text after <|eot|> (DTT) or after the last '#' (COCONUT's layouts)
  c.eval.answer_match = 'lenient'
  # >= 0: the reasoning budget forced at decoding (reports in <split>@budget<k>/): DTT's span positions before
  # <|eot|>, COCONUT's / pause-as-thought's thoughts, the Pause baseline's pauses (python -m dtt_jax.eval.budget)
  c.eval.budget = -1
  c.eval.stages = ('bootstrap', 'grpo')  # the trained stages evaluated (those with checkpoints)

  return c
