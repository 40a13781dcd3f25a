//! metapeft: prepare pretrained language models for fast, data- and parameter-efficient
//! adaptation, then adapt, evaluate and export them.
//!
//! Data flows one way: checkpoint -> [`model`] (frozen base + deltas) -> task data -> trainer ->
//! metrics -> export. Parameters are passed explicitly in [`params::ParamStore`]s.

pub mod error;
pub mod ops;
pub mod params;
pub mod quant;

pub use error::{Error, Result};
pub mod assets;
pub mod bench;
pub mod data;
pub mod eval;
pub mod generate;
pub mod io;
pub mod meta;
pub mod model;
pub mod peft;
pub mod runtime;
pub mod train;
