//! Datasets: JSONL and Parquet prompts, field mapping, benchmarks, synthetic tasks.

pub mod benchmarks;
