//! Activation checkpointing: a block (a decoder layer) runs as one op that keeps only its input.
//! The forward runs the block without recording a graph; the backward re-runs it with one and
//! differentiates that. Peak memory drops from every layer's saved activations to the layer
//! inputs plus one layer's graph, for the price of a second forward pass of each block.
//!
//! candle's custom ops return gradients for their tensor arguments only, while a block reads many
//! trainable tensors (LoRA factors, norm weights). The re-run's backward finds their gradients;
//! they are parked in a per-thread sink that [`backward`] adds into the `GradStore` of the outer
//! backward pass. Code that checkpoints must therefore call [`backward`], never
//! `Tensor::backward` directly (a forward that finds uncollected gradients is an error).
//!
//! Not for the thread that keeps the graph of gradients (exact second-order MAML): the re-run's
//! gradients would be cut from the outer graph, so models never checkpoint there.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, CustomOp1, Device, Layout, Result, Shape, Tensor, TensorId, Var};

/// A block's computation: `f(x, track)` must give the same values for both `track`s; with
/// `track == false` it should read detached parameters so that no graph is built.
pub type Block = dyn Fn(&Tensor, bool) -> Result<Tensor> + Send + Sync;

thread_local! {
    /// Gradients of the tensors blocks read, from the re-runs of the backward in progress.
    static SINK: RefCell<HashMap<TensorId, Tensor>> = RefCell::new(HashMap::new());
}

struct Checkpoint {
    block: Arc<Block>,
}

impl Checkpoint {
    fn input(s: &CpuStorage, l: &Layout) -> Result<Tensor> {
        let (a, b) = l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("checkpoint: non-contiguous input".into()))?;
        let dev = Device::Cpu;
        match s {
            CpuStorage::F32(v) => Tensor::from_slice(&v[a..b], l.shape(), &dev),
            CpuStorage::F64(v) => Tensor::from_slice(&v[a..b], l.shape(), &dev),
            _ => candle_core::bail!("checkpoint: blocks run in f32 or f64"),
        }
    }
}

impl CustomOp1 for Checkpoint {
    fn name(&self) -> &'static str {
        "metapeft-checkpoint"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = Self::input(s, l)?;
        let y = (self.block)(&x, false)?;
        let shape = y.shape().clone();
        let y = y.flatten_all()?;
        let storage = match y.dtype() {
            candle_core::DType::F32 => CpuStorage::F32(y.to_vec1()?),
            candle_core::DType::F64 => CpuStorage::F64(y.to_vec1()?),
            d => candle_core::bail!("checkpoint: block returned {d:?}"),
        };
        Ok((storage, shape))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let xv = Var::from_tensor(&x.detach())?;
        let y = (self.block)(xv.as_tensor(), true)?;
        let loss = (y * g.detach())?.sum_all()?;
        // Only leaf variables' gradients go to the sink: candle's store also holds gradients of
        // untracked operands (frozen weights, masks), as large as the layer's activations.
        let skip = xv.as_tensor().id();
        let leaves: Vec<TensorId> = loss
            .sorted_nodes()
            .iter()
            .filter(|n| n.is_variable() && n.id() != skip)
            .map(|n| n.id())
            .collect();
        let mut grads = loss.backward()?;
        let dx = grads.remove(xv.as_tensor());
        drop(loss);
        SINK.with(|sink| -> Result<()> {
            let mut sink = sink.borrow_mut();
            for id in leaves {
                let Some(grad) = grads.get_id(id).cloned() else {
                    continue;
                };
                let sum = match sink.remove(&id) {
                    Some(prev) => (prev + grad)?,
                    None => grad,
                };
                sink.insert(id, sum);
            }
            Ok(())
        })?;
        Ok(Some(match dx {
            Some(d) => d,
            None => x.zeros_like()?,
        }))
    }
}

/// `block(x)` as one checkpointed op: see the module documentation. `x` should be tracked
/// (a `Var` or the output of tracked ops), or the backward never reaches the block.
pub fn checkpoint(x: &Tensor, block: Arc<Block>) -> Result<Tensor> {
    if !x.device().is_cpu() {
        // No re-run on other devices yet: the plain graph.
        return block(x, true);
    }
    let uncollected = SINK.with(|s| !s.borrow().is_empty());
    if uncollected {
        candle_core::bail!(
            "activation checkpointing: gradients of an earlier backward pass were never \
             collected (call ops::backward, not Tensor::backward)"
        );
    }
    x.contiguous()?.apply_op1(Checkpoint { block })
}

/// `loss.backward()` plus the gradients that checkpointed blocks found while re-running.
pub fn backward(loss: &Tensor) -> Result<GradStore> {
    SINK.with(|s| s.borrow_mut().clear());
    let out = loss.backward();
    let parked = SINK.with(|s| std::mem::take(&mut *s.borrow_mut()));
    let mut grads = out?;
    for (id, g) in parked {
        let sum = match grads.get_id(id) {
            Some(prev) => (prev + g)?,
            None => g,
        };
        grads.insert_id(id, sum);
    }
    Ok(grads)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::randn_f64;

    /// A block reading two trainable tensors (one also used outside the block) and the input.
    #[test]
    fn gradients_equal_the_plain_graph() -> Result<()> {
        let w = Var::from_tensor(&randn_f64(&[4, 4], 1, 0.5)?)?;
        let b = Var::from_tensor(&randn_f64(&[4], 2, 0.5)?)?;
        let x0 = Var::from_tensor(&randn_f64(&[3, 4], 3, 1.0)?)?;
        let make = |w: Var, b: Var| -> Arc<Block> {
            Arc::new(move |x: &Tensor, track: bool| {
                let (w, b) = if track {
                    (w.as_tensor().clone(), b.as_tensor().clone())
                } else {
                    (w.as_tensor().detach(), b.as_tensor().detach())
                };
                x.matmul(&w)?.broadcast_add(&b)?.tanh()? * x
            })
        };
        let block = make(w.clone(), b.clone());
        let run = |ckpt: bool| -> Result<Vec<Tensor>> {
            let mut h = x0.as_tensor().clone();
            for _ in 0..3 {
                h = if ckpt {
                    checkpoint(&h, block.clone())?
                } else {
                    block(&h, true)?
                };
            }
            // `b` is also read outside the blocks.
            let loss = (h.sqr()?.sum_all()? + b.as_tensor().sum_all()?)?;
            let g = if ckpt {
                backward(&loss)?
            } else {
                loss.backward()?
            };
            Ok([w.as_tensor(), b.as_tensor(), x0.as_tensor()]
                .iter()
                .map(|t| g.get(t).cloned().expect("gradient"))
                .collect())
        };
        let (plain, ckpt) = (run(false)?, run(true)?);
        for (a, c) in plain.iter().zip(&ckpt) {
            let d = (a - c)?.abs()?.max_all()?.to_scalar::<f64>()?;
            assert!(d < 1e-12, "checkpointed gradient differs by {d}");
        }
        Ok(())
    }

    #[test]
    fn uncollected_gradients_are_an_error() -> Result<()> {
        let w = Var::from_tensor(&randn_f64(&[2, 2], 4, 0.5)?)?;
        let block: Arc<Block> = {
            let w = w.clone();
            Arc::new(move |x: &Tensor, _| x.matmul(w.as_tensor()))
        };
        let x = Var::from_tensor(&randn_f64(&[2, 2], 5, 1.0)?)?;
        let y = checkpoint(x.as_tensor(), block.clone())?;
        let _lost = y.sum_all()?.backward()?; // plain backward: the sink keeps w's gradient
        let err = checkpoint(x.as_tensor(), block.clone()).unwrap_err();
        assert!(err.to_string().contains("ops::backward"), "{err}");
        // The wrapper clears it.
        let y = checkpoint(x.as_tensor(), block.clone());
        assert!(y.is_err());
        backward(&x.as_tensor().sum_all()?)?;
        let y = checkpoint(x.as_tensor(), block)?;
        let g = backward(&y.sum_all()?)?;
        assert!(g.get(w.as_tensor()).is_some());
        Ok(())
    }
}
