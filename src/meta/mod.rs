//! Meta-learning over a distribution of tasks: the MAML family (first-order, exact and
//! Hessian-free second-order, Reptile, ANIL, Meta-SGD), MLtD and priming.
//!
//! Parameters are passed explicitly: an episode's fast weights are just another
//! [`crate::params::ParamStore`], so no model is mutated during meta-learning.

pub mod episode;
pub mod maml;
pub mod second_order;
pub mod tams;
#[cfg(test)]
mod tests;
pub mod trainer;

pub use episode::LmEpisode;
pub use maml::{EpisodeGrads, EpisodeLoss, InnerLoop};
pub use trainer::{meta_train, Algo, MetaConfig, MetaModel, MetaReport, TamsParts};
