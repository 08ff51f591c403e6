//! Evaluations: the compress-once pipeline, long-context tasks and their scoring.
pub mod pipeline;
pub mod score;
pub mod tasks;
