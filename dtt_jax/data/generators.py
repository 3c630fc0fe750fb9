"""Generated datasets, deterministic from a seed: multi-digit addition, ProsQA and ProsQA-mini (SPEC §9).

Both give records `{question, steps, answer}` like the file readers in `loaders.py`.

* Addition (the COCONUT addition curriculum of seed 002): two n-digit operands, n uniform in
  [min_digits, max_digits]; one step per digit column, least significant first, and a last step for a final carry:
  `347 + 285 =` -> steps `7+5=12 write 2 carry 1`, `4+8+1=13 write 3 carry 1`, `3+2+1=6 write 6`, answer `632`
  (`95 + 87 =` ends with `9+8+1=18 write 8 carry 1`, `carry 1 write 1`, answer `182`). Train, valid and test are
  disjoint by construction: a problem belongs to the split picked by a hash of its question.
* ProsQA: COCONUT's Algorithm 1 (arXiv:2412.06769, App. A.2), since the official train file cannot be shipped.
  A DAG over `PROSQA_NODES` nodes is grown node by node; each new node takes Poisson(1.5) parents, drawn from the
  nodes that keep it out of node 1's family (35%), out of node 0's family (35%) or from all nodes (30%), weighted by
  1 + 1.5 * depth to prefer long chains. Nodes 0 and 1 are the two question entities; isolated nodes are dropped.
  The question asks about the entity whose exclusive family has the deepest leaf; that leaf (shortest path of at
  least `PROSQA_MIN_PATH` steps) is the answer and a leaf of the other entity's exclusive family the distractor.
  Parentless nodes are named with person names, the others with concept names (the valid set's vocabulary), and the
  question lists one sentence per edge in random order, then `Is {entity} a {A} or {B}?` (A, B in random order);
  the steps follow a shortest path chosen uniformly. Records carry `idx_to_symbol, edges, root, target, neg_target`
  like the official files. Two details are fitted to the valid set's statistics rather than read from the paper:
  parentless nodes are candidates only in the "all nodes" branch (this reproduces the valid set's entity count and
  in-degree distribution), and N = 28 (the valid set's largest graph; see `tests/test_data_generators.py`).
* ProsQA-mini: the same generator on smaller graphs, N = `PROSQA_MINI_NODES` = 6 (5.7 nodes and 4.2 edges on
  average after isolated nodes are dropped; questions of ~47 GPT-2 tokens, at most 73) and answer paths of at
  least `PROSQA_MINI_MIN_PATH` = 2 steps (94% 2, 6% 3; ProsQA: N = 28, 22.8 nodes, 36 edges, 3-6 steps). At N = 8
  the study's CoT model reached 60% test accuracy (chance: 50%) in 1300 steps, at N = 6 83% (docs/study.md).
  Still a search: every edge is listed in random order and the answer is one of two leaves, one per entity. Train,
  valid and test are disjoint like addition's, by a hash of the question (`question_split`); each split has its
  own random stream.
"""

from __future__ import annotations

import collections
import itertools
import math
import random
import zlib
from collections.abc import Iterable, Sequence

SPLITS = ('train', 'valid', 'test')

# ---------------------------------------------------------------------------------------------------------------
# Addition

_HOLDOUT_BUCKETS = 20  # hash buckets of a question: 0 -> test, 1 -> valid, the rest -> train (90%)


def question_split(question: str) -> str:
  """The split a generated question belongs to (a hash of its text, so splits never share a question)."""
  bucket = zlib.crc32(question.encode('utf-8')) % _HOLDOUT_BUCKETS
  return 'test' if bucket == 0 else 'valid' if bucket == 1 else 'train'


def addition_split(question: str) -> str:
  """The split a generated addition problem belongs to (`question_split`)."""
  return question_split(question)


def addition_record(a: int, b: int) -> dict:
  """`{question: 'a + b =', steps: ['7+5=12 write 2 carry 1', ...], answer: str(a + b)}` for a, b >= 0."""
  if a < 0 or b < 0:
    raise ValueError(f'addition_record needs non-negative operands, got {a} and {b}.')
  da, db = str(a)[::-1], str(b)[::-1]
  steps, carry = [], 0
  for i in range(max(len(da), len(db))):
    x = int(da[i]) if i < len(da) else 0
    y = int(db[i]) if i < len(db) else 0
    total = x + y + carry
    step = f'{x}+{y}+{carry}={total}' if carry else f'{x}+{y}={total}'
    step += f' write {total % 10}'
    carry = total // 10
    if carry:
      step += f' carry {carry}'
    steps.append(step)
  if carry:
    steps.append(f'carry {carry} write {carry}')
  return {'question': f'{a} + {b} =', 'steps': steps, 'answer': str(a + b)}


def generate_addition(size: int, seed: int = 0, split: str = 'train', min_digits: int = 2,
                      max_digits: int = 4) -> list[dict]:
  """`size` i.i.d. problems of the split (both operands n digits, n uniform in [min_digits, max_digits])."""
  if split not in SPLITS:
    raise ValueError(f'split={split!r}: expected one of {SPLITS}.')
  if not 1 <= min_digits <= max_digits:
    raise ValueError(f'Need 1 <= min_digits <= max_digits, got min_digits={min_digits}, max_digits={max_digits}.')
  if size < 0:
    raise ValueError(f'size={size} must be >= 0.')
  rng = random.Random(f'addition/{split}/{seed}')
  records = []
  while len(records) < size:
    n = rng.randint(min_digits, max_digits)
    lo, hi = 10 ** (n - 1) if n > 1 else 0, 10 ** n - 1
    a, b = rng.randint(lo, hi), rng.randint(lo, hi)
    if addition_split(f'{a} + {b} =') == split:
      records.append(addition_record(a, b))
  return records


# ---------------------------------------------------------------------------------------------------------------
# ProsQA

PROSQA_ENTITIES = ('Alex', 'Bob', 'Carol', 'Davis', 'Eva', 'Fae', 'Gabriel', 'Jack', 'Max', 'Oliver', 'Polly', 'Rex',
                   'Sally', 'Sam', 'Stella', 'Tom', 'Wren')
PROSQA_CONCEPTS = ('bompus', 'boompus', 'brimpus', 'chorpus', 'dumpus', 'felpus', 'fompus', 'gerpus', 'gorpus',
                   'grimpus', 'gwompus', 'hilpus', 'impus', 'jelpus', 'jompus', 'kerpus', 'lempus', 'lorpus', 'numpus',
                   'quimpus', 'rempus', 'rompus', 'rorpus', 'scrompus', 'shumpus', 'sterpus', 'storpus', 'terpus',
                   'timpus', 'tumpus', 'vumpus', 'worpus', 'wumpus', 'yerpus', 'yimpus', 'yumpus', 'zhorpus', 'zumpus')
PROSQA_NODES = 28  # N of Algorithm 1 (before isolated nodes are dropped)
PROSQA_MIN_PATH = 3  # shortest root -> answer path, in steps (the valid set has 3..6)
PROSQA_MINI_NODES = 6  # ProsQA-mini's N
PROSQA_MINI_MIN_PATH = 2
_MEAN_PARENTS = 1.5
_DEPTH_WEIGHT = 1.5


def _poisson(rng: random.Random, lam: float) -> int:
  """Knuth's method (small lam)."""
  limit, k, p = math.exp(-lam), 0, rng.random()
  while p > limit:
    k += 1
    p *= rng.random()
  return k


def _weighted_sample(rng: random.Random, items: Sequence[int], weights: Sequence[float], k: int) -> list[int]:
  """k distinct items, drawn one at a time with probability proportional to weight."""
  items, weights, out = list(items), list(weights), []
  for _ in range(k):
    i = rng.choices(range(len(items)), weights)[0]
    out.append(items.pop(i))
    weights.pop(i)
  return out


def prosqa_graph(rng: random.Random, num_nodes: int = PROSQA_NODES) -> list[tuple[int, int]]:
  """Algorithm 1: edges (parent, child) over nodes 0..num_nodes-1, children after parents; 0, 1: the entities."""
  label = [1, 2]  # bit 1: descendant of node 0; bit 2: descendant of node 1
  group = {0: [], 1: [0], 2: [1], 3: []}  # nodes by label
  depth = [0, 0]
  edges = []
  for node in range(2, num_nodes):
    u = rng.random()
    if u <= 0.35:
      candidates = group[1]  # the new node stays out of node 1's family
    elif u <= 0.7:
      candidates = group[2]  # ... out of node 0's family
    else:
      candidates = list(range(node))
    k = min(_poisson(rng, _MEAN_PARENTS), len(candidates))
    parents = _weighted_sample(rng, candidates, [1 + _DEPTH_WEIGHT * depth[c] for c in candidates], k)
    new_label = 0
    for p in parents:
      edges.append((p, node))
      new_label |= label[p]
    label.append(new_label)
    group[new_label].append(node)
    depth.append(1 + max(depth[p] for p in parents) if parents else 0)
  return edges


def _bfs(children: dict[int, list[int]], source: int) -> tuple[dict[int, int], dict[int, int]]:
  """Shortest distance and number of shortest paths from `source` to every node it reaches."""
  dist, count, queue = {source: 0}, {source: 1}, [source]
  for u in queue:
    for v in children[u]:
      if v not in dist:
        dist[v], count[v] = dist[u] + 1, count[u]
        queue.append(v)
      elif dist[v] == dist[u] + 1:
        count[v] += count[u]
  return dist, count


def _prosqa_example(rng: random.Random, edges: list[tuple[int, int]], min_path: int = PROSQA_MIN_PATH
                    ) -> dict | None:
  """A ProsQA record from a graph, or None when the graph has no valid question (no answer `min_path` steps or
  more from its entity)."""
  nodes = sorted({0, 1} | {v for e in edges for v in e})
  index = {v: i for i, v in enumerate(nodes)}  # drop isolated nodes, keep the order (so 0 and 1 stay 0 and 1)
  edges = [(index[a], index[b]) for a, b in edges]
  n = len(nodes)
  children, parents = collections.defaultdict(list), collections.defaultdict(list)
  for a, b in edges:
    children[a].append(b)
    parents[b].append(a)
  bfs = [_bfs(children, 0), _bfs(children, 1)]
  leaves = [[v for v in bfs[e][0] if v > 1 and v not in bfs[1 - e][0] and not children[v]] for e in (0, 1)]
  if not leaves[0] or not leaves[1]:
    return None
  deepest = [max(bfs[e][0][v] for v in leaves[e]) for e in (0, 1)]
  root = 0 if deepest[0] > deepest[1] else 1 if deepest[1] > deepest[0] else rng.randrange(2)
  dist, count = bfs[root]
  if deepest[root] < min_path:
    return None
  target = rng.choice([v for v in leaves[root] if dist[v] == deepest[root]])
  neg_target = rng.choice(leaves[1 - root])

  entities = [v for v in range(n) if not parents[v]]
  concepts = [v for v in range(n) if parents[v]]
  if len(entities) > len(PROSQA_ENTITIES) or len(concepts) > len(PROSQA_CONCEPTS):
    return None
  symbol = [''] * n
  for v, name in zip(entities, rng.sample(PROSQA_ENTITIES, len(entities))):
    symbol[v] = name
  for v, name in zip(concepts, rng.sample(PROSQA_CONCEPTS, len(concepts))):
    symbol[v] = name

  def sentence(a: int, b: int) -> str:
    return f'{symbol[a]} is a {symbol[b]}.' if not parents[a] else f'Every {symbol[a]} is a {symbol[b]}.'

  statements = [sentence(a, b) for a, b in edges]
  rng.shuffle(statements)
  options = [symbol[target], symbol[neg_target]]
  rng.shuffle(options)
  path = [target]  # a uniformly chosen shortest path, walked back from the target
  while path[-1] != root:
    v = path[-1]
    preds = [p for p in parents[v] if dist.get(p) == dist[v] - 1]
    path.append(rng.choices(preds, [count[p] for p in preds])[0])
  path.reverse()
  return {
      'question': ' '.join(statements) + f' Is {symbol[root]} a {options[0]} or {options[1]}?',
      'steps': [sentence(a, b) for a, b in zip(path, path[1:])],
      'answer': f'{symbol[root]} is a {symbol[target]}.',
      'idx_to_symbol': symbol, 'edges': [list(e) for e in edges], 'root': root, 'target': target,
      'neg_target': neg_target,
  }


def generate_prosqa(size: int, seed: int = 0, exclude: Iterable[str] = (), num_nodes: int = PROSQA_NODES
                    ) -> list[dict]:
  """`size` ProsQA records with distinct questions, none of them in `exclude` (e.g. the valid and test questions)."""
  if size < 0:
    raise ValueError(f'size={size} must be >= 0.')
  rng = random.Random(f'prosqa/{seed}')
  seen = set(exclude)
  records = []
  while len(records) < size:
    record = _prosqa_example(rng, prosqa_graph(rng, num_nodes))
    if record is not None and record['question'] not in seen:
      seen.add(record['question'])
      records.append(record)
  return records


def generate_prosqa_mini(size: int, seed: int = 0, split: str = 'train', num_nodes: int = PROSQA_MINI_NODES,
                         min_path: int = PROSQA_MINI_MIN_PATH) -> list[dict]:
  """`size` ProsQA-mini records of `split` with distinct questions (ProsQA's generator on `num_nodes` nodes, answer
  paths of `min_path` steps or more; the split is `question_split` of the question)."""
  if split not in SPLITS:
    raise ValueError(f'split={split!r}: expected one of {SPLITS}.')
  if size < 0:
    raise ValueError(f'size={size} must be >= 0.')
  if num_nodes < 4 or min_path < 1:
    raise ValueError(f'ProsQA-mini needs num_nodes >= 4 and min_path >= 1, got {num_nodes} and {min_path}.')
  rng = random.Random(f'prosqa_mini/{split}/{seed}')
  seen, records = set(), []
  for tries in itertools.count():
    if len(records) == size:
      break
    if tries > 1000 * (len(records) + 10):
      raise ValueError(f'ProsQA-mini graphs of {num_nodes} nodes almost never have an answer {min_path} steps away: '
                       'raise num_nodes or lower min_path.')
    record = _prosqa_example(rng, prosqa_graph(rng, num_nodes), min_path)
    if record is not None and record['question'] not in seen and question_split(record['question']) == split:
      seen.add(record['question'])
      records.append(record)
  return records


def prosqa_statistics(records: Sequence[dict]) -> dict[str, float]:
  """Means over records with graph fields: nodes, edges, shortest root->target path, number of shortest paths."""
  if not records:
    raise ValueError('prosqa_statistics needs at least one record.')
  total = collections.Counter()
  for r in records:
    children = collections.defaultdict(list)
    for a, b in r['edges']:
      children[a].append(b)
    dist, count = _bfs(children, r['root'])
    total['nodes'] += len(r['idx_to_symbol'])
    total['edges'] += len(r['edges'])
    total['shortest_path'] += dist[r['target']]
    total['num_shortest_paths'] += count[r['target']]
  return {k: total[k] / len(records) for k in ('nodes', 'edges', 'shortest_path', 'num_shortest_paths')}
