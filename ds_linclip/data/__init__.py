"""webdataset shards -> training/eval batches (pipeline.py), shard specs (shards.py), shard writer (writer.py),
ImageFolder eval data (imagefolder.py), zero-shot class names and prompt templates (prompts.py).

The public names are imported lazily so that `python -m ds_linclip.data.writer` does not pay for torch.
"""

_PUBLIC = {
    "build_train_loader": "pipeline", "build_eval_loader": "pipeline", "tokenize": "pipeline",
    "TrainLoader": "pipeline", "merge_rank_states": "pipeline", "EvalLoader": "pipeline", "DataError": "shards",
    "ShardSpecError": "shards", "expand_urls": "shards", "parse_spec": "shards",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name):
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(f"ds_linclip.data.{_PUBLIC[name]}"), name)
    raise AttributeError(f"module 'ds_linclip.data' has no attribute {name!r}")
