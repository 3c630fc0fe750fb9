"""Datasets (SPEC §9) and the Stage-1 / Stage-2 batches built from them (SPEC §2, §5).

    loaders.py     file readers (GSM8K jsonl / iCoT txt / COCONUT json, ProsQA, ProntoQA) and `get_dataset`
    generators.py  generated addition and ProsQA (COCONUT Algorithm 1), deterministic from a seed
    samples.py     record -> prompt / completion ids with masks, fixed-shape batches, resumable iterator
    answers.py     answer extraction and per-dataset checking (imported directly: `dtt_jax.data.answers`)
"""

from dtt_jax.data.generators import (addition_record, generate_addition, generate_prosqa, prosqa_graph,
                                     prosqa_statistics)
from dtt_jax.data.loaders import (DATASETS, DEFAULT_FILES, GENERATED, SPLITS, default_data_dir, generator_args,
                                  get_dataset, load_splits, read_file)
from dtt_jax.data.samples import (BATCH_FIELDS, STEP_SEPARATOR, BatchIterator, EncodedRecords, Prompts,
                                  SampleConfig, Stage1Batch, build_prompts, build_stage1_batch, compact_vocab,
                                  draw_filler, encode_stage1, filler_token_ids, prompt_iterator, record_texts,
                                  stage1_batch, stage1_iterator)

__all__ = [
    'DATASETS', 'DEFAULT_FILES', 'GENERATED', 'SPLITS', 'default_data_dir', 'generator_args', 'get_dataset',
    'load_splits', 'read_file',
    'addition_record', 'generate_addition', 'generate_prosqa', 'prosqa_graph', 'prosqa_statistics',
    'BATCH_FIELDS', 'STEP_SEPARATOR', 'BatchIterator', 'EncodedRecords', 'Prompts', 'SampleConfig', 'Stage1Batch',
    'build_prompts', 'build_stage1_batch', 'compact_vocab', 'draw_filler', 'encode_stage1', 'filler_token_ids',
    'prompt_iterator', 'record_texts', 'stage1_batch', 'stage1_iterator',
]
