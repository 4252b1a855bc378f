//! Data: read rows → unpaired examples → tokenized rows with KL partners → collated micro-batches.
//! Knows nothing of the model beyond its tokenizer.
pub mod chat_template;
pub mod format;
pub mod over_ranks;
pub mod prepare;
mod python_json;
pub mod read;
pub mod tokenizer;
mod tokenizer_class;

pub use format::{examples_from_rows, examples_from_rows_skipping, Content, Example};
pub use prepare::{collate, prepare, Batch, PrepareOptions, Prepared, TokenizedRow};
pub use read::{read_dataset, read_rows, rename_columns, RawRow};
pub use tokenizer::TextTokenizer;
