//! Training one task: optimisers, learning-rate schedules, gradient clipping and accumulation,
//! periodic evaluation with early stopping, atomic checkpoints that resume to the same numbers,
//! a JSONL metrics log, and a clear stop on a non-finite loss.
//!
//! The trainer knows nothing about models, data or file formats: a [`Objective`] gives it the
//! loss of a micro-batch and an evaluation metric, both as functions of the step.

pub mod checkpoint;
pub mod objectives;
pub mod optim;
pub mod plot;
pub mod schedule;
pub mod setup;
#[cfg(test)]
mod tests;
pub mod trainer;

pub use optim::{Optimizer, OptimizerConfig};
pub use schedule::Schedule;
pub use trainer::{train, Objective, TrainConfig, TrainReport};
