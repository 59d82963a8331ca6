"""Thin adapters to the trainers and data tools people already use (docs/integrations.md).

- :mod:`logitcache.integrations.rows`: a map-style dataset of cache row ids, the collator that
  turns them into KD batches, and ``logitcache train``'s row order as a torch sampler (torch only);
- :mod:`logitcache.integrations.transformers`: ``KDTrainer`` / ``KDTrainerMixin`` for Hugging
  Face's ``Trainer`` and TRL's ``SFTTrainer`` (needs the ``hf`` extra);
- :mod:`logitcache.integrations.datasets`: a cache as a streaming ``datasets.IterableDataset`` of
  decoded columns (needs the ``datasets`` extra).

Nothing is imported here, so ``import logitcache.integrations`` pulls in neither transformers nor
datasets. Like the rest of the training side, nothing here imports ``logitcache.dump``.
"""
