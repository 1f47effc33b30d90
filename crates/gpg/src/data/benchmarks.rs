//! Evaluation benchmarks shipped with the repository and their gold answers.
