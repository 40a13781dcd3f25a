//! A thread on which candle keeps the graph of gradients, for exact second-order MAML.
//!
//! candle detaches every gradient unless `CANDLE_GRAD_DO_NOT_DETACH` is set, and reads that
//! variable once per thread, at the thread's first backward pass. So a fresh thread sets it,
//! latches it with a tiny backward pass, and puts the environment back: other threads (and
//! ordinary first-order training, which would pay ~40% more time and 3x the memory with graphs
//! kept) are unaffected.

use std::sync::Mutex;

use candle_core::{Device, Var};

use crate::{Error, Result};

const VAR: &str = "CANDLE_GRAD_DO_NOT_DETACH";

thread_local! {
    /// Whether this thread keeps the graph of gradients (it runs `on_graph_thread`'s closure).
    static GRAPH_THREAD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether gradients computed on this thread keep their graph (second-order MAML): fused ops
/// that would otherwise hand back a precomputed, constant gradient must then build it from
/// differentiable tensor ops.
pub fn keeps_grad_graph() -> bool {
    GRAPH_THREAD.with(|g| g.get())
}

/// Serialises the set-latch-restore window of the environment variable.
static LATCH: Mutex<()> = Mutex::new(());

/// Differentiating through an inner loop walks a deep graph recursively: give it a big stack
/// (address space only; pages are touched as needed).
const STACK: usize = 512 << 20;

fn latch() -> Result<()> {
    let _guard = LATCH.lock().unwrap_or_else(|e| e.into_inner());
    let prev = std::env::var_os(VAR);
    std::env::set_var(VAR, "1");
    let check = (|| -> Result<bool> {
        // d/dx (x^3) = 3x^2 keeps a graph only if gradients are not detached: d2 = 6x.
        let x = Var::new(&[2f64], &Device::Cpu)?;
        let y = x.as_tensor().powf(3.0)?.sum_all()?;
        let g = y.backward()?;
        let gx = g
            .get(x.as_tensor())
            .ok_or_else(|| Error::invalid("no gradient in the latch check"))?;
        let g2 = gx.sum_all()?.backward()?;
        Ok(g2
            .get(x.as_tensor())
            .and_then(|t| t.to_vec1::<f64>().ok())
            .is_some_and(|v| (v[0] - 12.0).abs() < 1e-9))
    })();
    match prev {
        Some(v) => std::env::set_var(VAR, v),
        None => std::env::remove_var(VAR),
    }
    if check? {
        Ok(())
    } else {
        Err(Error::invalid(
            "candle did not keep the graph of gradients on the second-order thread",
        ))
    }
}

/// A fresh pool as large as the current one, whose threads have never run a backward pass.
///
/// Its threads, not a lone thread next to the current pool: the command runs on a worker of the
/// global pool (`runtime::run_on_pool`), which waits here, and a lone thread's kernels would then
/// have only the pool's other workers.
fn fresh_pool(name: &'static str) -> Result<rayon::ThreadPool> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(rayon::current_num_threads())
        .stack_size(STACK)
        .thread_name(move |i| format!("{name}-{i}"))
        .build()
        .map_err(|e| Error::invalid(format!("cannot start the {name} threads: {e}")))
}

/// Run `f` on a fresh thread where backward passes keep the graph of their gradients.
pub fn on_graph_thread<T: Send>(f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    let out = fresh_pool("metapeft-second-order")?.install(|| {
        latch()?;
        GRAPH_THREAD.with(|g| g.set(true));
        f()
    });
    crate::runtime::release_free_memory();
    out
}

/// `loss.backward()` on a fresh ordinary thread, where gradients are detached.
///
/// The last backward pass of an episode (query loss to meta-variables) needs no graph of its
/// own; run on the graph thread it would keep every intermediate of the double backward alive
/// until it returned (measured: 5.8 GB of an 8 GB peak at 4 x 32 tokens on SmolLM2-135M).
pub fn backward_detached(loss: &candle_core::Tensor) -> Result<candle_core::backprop::GradStore> {
    let grads = fresh_pool("metapeft-backward")?.install(|| Ok(crate::ops::backward(loss)?));
    crate::runtime::release_free_memory();
    grads
}
