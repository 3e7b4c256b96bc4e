"""Data preparation: sources -> tokenized, packed (pretrain) or masked (SFT) dataset on disk.

Entry points: `data_prep.prepare.prepare(recipe)`, `data_prep.prepare.is_prepared(recipe)`,
`data_prep.collate.DataCollator`, and the offline assets in `data_prep.assets`
(`load_tokenizer`, `resolve_model`, `resolve_corpus`).
"""

from data_prep.errors import DataError

__all__ = ["DataError"]
