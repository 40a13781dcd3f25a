//! Running a model's layers under activation checkpointing ([`crate::ops::checkpoint`]): the
//! part every architecture shares (when it applies, the stores each re-run reads, the tracked
//! input), so a model only says how to run layer `i`.

use std::sync::Arc;

use candle_core::{Tensor, Var};

use crate::params::ParamStore;
use crate::peft::DeltaSet;
use crate::Result;

/// Whether a model with checkpointing switched `on` should checkpoint a pass over `x`: CPU only,
/// and never on the thread that keeps the graph of gradients (exact second-order MAML).
pub(crate) fn applies(on: bool, x: &Tensor) -> bool {
    on && x.device().is_cpu() && !crate::meta::second_order::keeps_grad_graph()
}

/// What layer `i` reads: base store, deltas, delta store.
pub(crate) type Layer =
    dyn Fn(usize, &ParamStore, &DeltaSet, &ParamStore, &Tensor) -> Result<Tensor> + Send + Sync;

/// `x` through `n` layers, each one checkpointed op. The forward reads detached stores (no graph
/// is built); the backward's re-run reads the tracked ones.
pub(crate) fn layers(
    n: usize,
    p: &ParamStore,
    deltas: &DeltaSet,
    dp: &ParamStore,
    x: Tensor,
    layer: Arc<Layer>,
) -> Result<Tensor> {
    if deltas.is_stochastic() {
        return Err(crate::Error::invalid(
            "activation checkpointing re-runs each layer in the backward pass and cannot \
             replay LoRA dropout: set lora_dropout to 0 or turn checkpointing off",
        ));
    }
    struct Stores {
        p: ParamStore,
        p_detached: ParamStore,
        deltas: DeltaSet,
        dp: ParamStore,
        dp_detached: ParamStore,
    }
    let stores = Arc::new(Stores {
        p: p.clone(),
        p_detached: p.detached(),
        deltas: deltas.clone(),
        dp: dp.clone(),
        dp_detached: dp.detached(),
    });
    // The op's backward runs only if its input is tracked; frozen embeddings are not.
    let mut x = if x.track_op() {
        x
    } else {
        Var::from_tensor(&x)?.as_tensor().clone()
    };
    for i in 0..n {
        let (s, layer) = (stores.clone(), layer.clone());
        let block: Arc<crate::ops::checkpoint::Block> = Arc::new(move |x: &Tensor, track| {
            let (p, dp) = if track {
                (&s.p, &s.dp)
            } else {
                (&s.p_detached, &s.dp_detached)
            };
            layer(i, p, &s.deltas, dp, x).map_err(|e| candle_core::Error::Msg(e.to_string()))
        });
        x = crate::ops::checkpoint::checkpoint(&x, block)?;
    }
    Ok(x)
}
