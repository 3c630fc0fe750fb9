"""Running a trunk's blocks (both families): per-block rematerialization and per-layer parameter gathers.

`run_blocks(blocks, x, cache, remat, call)` runs x [B,T,D] (and the KV cache, or None) through the blocks in order;
`call(block, layer, x, cache) -> (x, cache)` runs one of them. Same values as the plain loop, in every mode.

Rematerialization, `config.model.remat` (the trunk config's `remat`):
  'none'   autodiff keeps every block's intermediates for the backward pass: the fastest, the most memory.
  'block'  each block is one `jax.checkpoint` that saves nothing: only its input [B,T,D] is kept, and the backward
           pass runs the block's forward again (about one more forward pass: ~4/3 of the step's FLOPs).
  'dots'   as 'block', but the products with the weights are saved (`dots_with_no_batch_dims_saveable`): the
           backward recomputes the norms, activations and attention only; more memory than 'block', less compute.
A call over one position (a decoding step, a step of the recurrent unroll, whose backward runs right after its
forward) is never rematerialized: its intermediates are a few [B,D] rows.

Per-layer parameter gathers under FSDP: inside a step traced under `parallel.gathers_per_layer(mesh)` (the GRPO
step with remat on), block l's parameters arrive sharded and are gathered inside its checkpoint, so the backward
gathers them again rather than keeping them, and its weight gradients are reduce-scattered as soon as the block's
backward made them (`parallel.gather_layer`). An optimization barrier ties block l + 1's gather to block l's input,
so that one or two layers' full weights exist at a time, if the scheduler follows: XLA's CPU backend does not (it
issues every layer's gather at the start of the step and keeps them live; docs/scaling.md), so the CPU dry run
counts all of them. The collectives move the stored (float32 master) weights and float32 gradients; the blocks cast
to the compute dtype.
"""

from __future__ import annotations

import jax
from flax import nnx

from dtt_jax import parallel

REMAT = ('none', 'block', 'dots')
BLOCK_LISTS = ('h', 'layers')  # the trunk's list of blocks: GPT2.h, Llama.layers
_POLICIES = {'block': jax.checkpoint_policies.nothing_saveable,
             'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def check_remat(remat: str) -> None:
  if remat not in REMAT:
    raise ValueError(f'config.model.remat={remat!r}: expected one of {", ".join(map(repr, REMAT))} (rematerialize '
                     'nothing, each block, or each block but its matmul outputs).')


def is_block_param(path) -> bool:
  """Whether a key path of a DTT model's params tree (`model.gpt2.h[i]...`, `model.gpt2.layers[i]...`) is in a block:
  the parameters `run_blocks` gathers itself under per-layer gathers."""
  keys = [getattr(p, 'key', None) for p in path]
  return len(keys) > 2 and keys[0] == 'gpt2' and keys[1] in BLOCK_LISTS


def run_blocks(blocks, x, cache, remat: str, call):
  """x [B,T,D], cache (KVCache or None) -> (x, cache) after every block of `blocks` (module docstring)."""
  mesh = parallel.layer_mesh()
  policy = _POLICIES.get(remat) if x.shape[1] > 1 else None
  if mesh is None and policy is None:
    for layer, block in enumerate(blocks):
      x, cache = call(block, layer, x, cache)
    return x, cache
  split = [nnx.split(block) for block in blocks]
  for layer, (graphdef, state) in enumerate(split):
    if mesh is not None and layer + 1 < len(split):  # block l + 1's gather waits for block l's input
      next_state, x = jax.lax.optimization_barrier((split[layer + 1][1], x))
      split[layer + 1] = (split[layer + 1][0], next_state)

    def run(state, x, cache, graphdef=graphdef, layer=layer):
      if mesh is not None:
        state = parallel.gather_layer(state, mesh)
      return call(nnx.merge(graphdef, state), layer, x, cache)

    x, cache = (run if policy is None else jax.checkpoint(run, policy=policy))(state, x, cache)
  return x, cache
