//! One decoding step of a Llama model on raw buffers, for generation from the base model.
//!
//! A decode step multiplies one row by every weight once, so it is bound by reading the weights.
//! On the tensor path each of the ~20 small ops per layer allocates its output and each matrix is
//! its own rayon fork-join: about half of a quantized step's time (BENCHMARKS.md). Here a token's
//! whole pass runs inside one `rayon::broadcast`: every thread takes a share of each matrix's rows
//! (and of the attention heads) and meets the others at a spin barrier, six times per layer. The
//! small ops on one row (norms, quantizing the activations) are cheap enough that every thread
//! computes them itself instead of waiting for one.
//!
//! Only the base model, in f32 (row-major, or in the panels of `BaseStorage::Packed`) or with
//! Q8_0/Q4_1 blocks (integer kernels, as the tensor path uses when decoding): anything else,
//! deltas included, takes the tensor path. The prompt also does (`gemm` is the right tool for
//! many rows); its KV cache is copied in ([`FusedDecoder::with_cache`]).

use std::cell::UnsafeCell;
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use candle_core::{CpuStorage, DType, Storage, Tensor};

use super::head_screen::{self, HeadScreen};
use super::llama::{KvCache, Llama};
use crate::ops::matvec::{dot_fn, DotFn};
use crate::ops::quantized_linear::rescore_near_top;
use crate::ops::QuantizedWeight;
use crate::params::ParamStore;
use crate::quant::{quantize_input, Q8Block, QWeight};
use crate::{Error, Result};

/// Whether generation may use the fused decoder: `METAPEFT_FUSED_DECODE=0` turns it off (A/B
/// timing against the tensor path).
pub(crate) fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("METAPEFT_FUSED_DECODE").map_or(true, |v| v != "0"))
}

/// What a step gives back.
enum Next {
    Logits(Vec<f32>),
    Token(u32),
}

/// A weight matrix `[n, k]` as the decoder reads it.
enum Matrix {
    /// Contiguous f32, bf16 or f16 storage, read in place (half precision widened per row).
    Dense { t: Tensor, n: usize, k: usize },
    /// Q8_0 / Q4_1 blocks.
    Quant(QWeight),
    /// f32 in 16-row panels (the inference layout), read in place.
    Panels(QuantizedWeight),
}

impl Matrix {
    fn of(p: &ParamStore, name: &str, n: usize, k: usize) -> Option<Self> {
        if let Some(q) = p.quantized(name) {
            if q.is_panels() {
                return (q.dims() == (n, k)).then(|| Matrix::Panels(q.clone()));
            }
            let q = q.integer_view()?;
            return (q.n == n && q.k == k).then_some(Matrix::Quant(q));
        }
        let t = p.get(name).ok()?;
        let ok = matches!(t.dtype(), DType::F32 | DType::BF16 | DType::F16)
            && t.device().is_cpu()
            && t.is_contiguous()
            && t.dims() == [n, k];
        ok.then(|| Matrix::Dense { t: t.clone(), n, k })
    }

    fn is_quantized(&self) -> bool {
        matches!(self, Matrix::Quant(_))
    }
}

/// An f32 vector parameter (norm weight, bias), copied.
fn vector(p: &ParamStore, name: &str, n: usize) -> Option<Vec<f32>> {
    let t = p.get(name).ok()?;
    if t.dtype() != DType::F32 || t.dims() != [n] {
        return None;
    }
    t.to_vec1::<f32>().ok()
}

struct Projection {
    w: Matrix,
    bias: Option<Vec<f32>>,
}

impl Projection {
    fn of(p: &ParamStore, module: &str, n: usize, k: usize) -> Option<Self> {
        let w = Matrix::of(p, &format!("{module}.weight"), n, k)?;
        let bias_name = format!("{module}.bias");
        let bias = match p.contains(&bias_name) {
            true => Some(vector(p, &bias_name, n)?),
            false => None,
        };
        Some(Self { w, bias })
    }

    /// `out += bias[rows]`, if there is a bias.
    fn add_bias(&self, out: &mut [f32], rows: Range<usize>) {
        if let Some(b) = &self.bias {
            out.iter_mut().zip(&b[rows]).for_each(|(y, b)| *y += b);
        }
    }
}

struct Layer {
    attn_norm: Vec<f32>,
    ffn_norm: Vec<f32>,
    q: Projection,
    k: Projection,
    v: Projection,
    o: Projection,
    gate: Projection,
    up: Projection,
    down: Projection,
}

/// A buffer the threads of one step share: between two barriers, each element is written by at
/// most one thread and read by none but that one.
struct Shared {
    data: Box<[UnsafeCell<f32>]>,
}

// SAFETY: access is coordinated by the step's barriers (see the type's comment).
unsafe impl Sync for Shared {}

impl Shared {
    fn zeros(n: usize) -> Self {
        Self {
            data: (0..n).map(|_| UnsafeCell::new(0.0)).collect(),
        }
    }

    fn len(&self) -> usize {
        self.data.len()
    }

    /// # Safety
    /// No other thread writes `r` until the caller's next barrier.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice_mut(&self, r: Range<usize>) -> &mut [f32] {
        assert!(r.start <= r.end && r.end <= self.data.len());
        std::slice::from_raw_parts_mut(
            UnsafeCell::raw_get(self.data.as_ptr().add(r.start)),
            r.len(),
        )
    }

    /// # Safety
    /// No thread writes `r` until the caller's next barrier.
    unsafe fn slice(&self, r: Range<usize>) -> &[f32] {
        assert!(r.start <= r.end && r.end <= self.data.len());
        std::slice::from_raw_parts(
            UnsafeCell::raw_get(self.data.as_ptr().add(r.start)),
            r.len(),
        )
    }

    fn get_mut(&mut self) -> &mut [f32] {
        // SAFETY: `&mut self` excludes every other access.
        unsafe { self.slice_mut(0..self.data.len()) }
    }
}

/// All threads of a step wait here until every one has arrived. Spins (the wait is normally a few
/// microseconds), yielding the core once it has spun for long. A thread that panics poisons it,
/// and every waiting thread then panics too instead of waiting forever.
struct SpinBarrier {
    n: usize,
    arrived: AtomicUsize,
    generation: AtomicUsize,
    poisoned: std::sync::atomic::AtomicBool,
}

impl SpinBarrier {
    fn new(n: usize) -> Self {
        Self {
            n,
            arrived: AtomicUsize::new(0),
            generation: AtomicUsize::new(0),
            poisoned: false.into(),
        }
    }

    fn wait(&self) {
        if self.n <= 1 {
            return;
        }
        let gen = self.generation.load(Ordering::Acquire);
        if self.arrived.fetch_add(1, Ordering::AcqRel) + 1 == self.n {
            self.arrived.store(0, Ordering::Relaxed);
            self.generation.fetch_add(1, Ordering::Release);
            return;
        }
        let mut spins = 0u32;
        while self.generation.load(Ordering::Acquire) == gen {
            if self.poisoned.load(Ordering::Relaxed) {
                panic!("another decoding thread panicked");
            }
            if spins < 20_000 {
                std::hint::spin_loop();
                spins += 1;
            } else {
                std::thread::yield_now();
            }
        }
    }

    /// Start over after a poisoned step (every thread is out of it).
    fn reset(&self) {
        self.arrived.store(0, Ordering::SeqCst);
        self.poisoned.store(false, Ordering::SeqCst);
    }
}

/// A step's work for thread `t` of `nt`, meeting the others at the barrier.
type Job<'a> = &'a (dyn Fn(usize, usize, &SpinBarrier) + Sync);
type ErasedJob = *const (dyn Fn(usize, usize, &SpinBarrier) + Sync + 'static);

/// Threads that run every step of one decoder together with the caller (thread 0). Spawned once
/// per decoder: `rayon::broadcast` per token woke sleeping pool threads through the kernel each
/// time, and rayon's idle workers yield in a loop before sleeping (`perf`: ~10% of a quantized
/// step in wake-ups and `sched_yield`). Between steps the workers spin a little, then park.
struct Team {
    state: std::sync::Arc<TeamState>,
    workers: Vec<std::thread::JoinHandle<()>>,
}

struct TeamState {
    threads: usize,
    barrier: SpinBarrier,
    /// A worker panicked in the current step.
    panicked: std::sync::atomic::AtomicBool,
    /// Bumped to start a step (and to stop).
    go: AtomicUsize,
    /// Workers done with the current step.
    done: AtomicUsize,
    stop: std::sync::atomic::AtomicBool,
    /// The current step's job, a `Job` with its lifetime erased: valid from the bump of `go`
    /// until `done` reaches `threads - 1` (the caller waits for that before returning).
    job: UnsafeCell<Option<JobPtr>>,
    parked: Vec<std::sync::atomic::AtomicBool>,
}

#[derive(Clone, Copy)]
struct JobPtr(ErasedJob);

// SAFETY: `job` is written only by the caller between steps, while every worker waits for `go`;
// workers read it only after seeing `go` change. The pointee is `Sync`.
unsafe impl Sync for TeamState {}
unsafe impl Send for JobPtr {}

/// How long an idle worker spins before parking (about 100-200 us): longer than the caller's
/// work between two tokens (sampling, detokenizing).
const IDLE_SPINS: u32 = 50_000;

impl Team {
    fn new(threads: usize) -> Self {
        let state = std::sync::Arc::new(TeamState {
            threads,
            barrier: SpinBarrier::new(threads),
            panicked: false.into(),
            go: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            stop: false.into(),
            job: UnsafeCell::new(None),
            parked: (0..threads).map(|_| false.into()).collect(),
        });
        let workers = (1..threads)
            .map(|t| {
                let st = state.clone();
                std::thread::Builder::new()
                    .name(format!("metapeft-decode-{t}"))
                    .spawn(move || st.work(t))
                    .expect("spawning a decode thread")
            })
            .collect();
        Self { state, workers }
    }

    /// Run `job(t, threads, barrier)` on every thread of the team, the caller being thread 0.
    /// A panic on any thread is re-raised here, after every thread has left the job.
    fn run(&self, job: Job<'_>) {
        let st = &*self.state;
        if st.threads == 1 {
            job(0, 1, &st.barrier);
            return;
        }
        // SAFETY: the workers are between steps (the previous `run` waited for all of them);
        // the erased lifetime ends after the wait below, which happens even if `job` panics.
        unsafe {
            let erased: *const (dyn Fn(usize, usize, &SpinBarrier) + Sync + '_) = job;
            *st.job.get() = Some(JobPtr(std::mem::transmute::<
                *const (dyn Fn(usize, usize, &SpinBarrier) + Sync + '_),
                ErasedJob,
            >(erased)));
        }
        st.done.store(0, Ordering::SeqCst);
        st.go.fetch_add(1, Ordering::SeqCst);
        self.wake();
        let mine = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            job(0, st.threads, &st.barrier)
        }));
        if mine.is_err() {
            st.barrier.poisoned.store(true, Ordering::SeqCst);
        }
        let mut spins = 0u32;
        while st.done.load(Ordering::Acquire) < st.threads - 1 {
            if spins < 20_000 {
                std::hint::spin_loop();
                spins += 1;
            } else {
                std::thread::yield_now();
            }
        }
        let theirs = st.panicked.swap(false, Ordering::SeqCst);
        if mine.is_err() || theirs {
            st.barrier.reset();
        }
        if let Err(p) = mine {
            std::panic::resume_unwind(p);
        }
        if theirs {
            panic!("a decoding thread panicked");
        }
    }

    fn wake(&self) {
        for (t, w) in self.workers.iter().enumerate() {
            if self.state.parked[t + 1].load(Ordering::SeqCst) {
                w.thread().unpark();
            }
        }
    }
}

impl TeamState {
    fn work(&self, t: usize) {
        let mut seen = 0;
        loop {
            let mut spins = 0u32;
            loop {
                let now = self.go.load(Ordering::SeqCst);
                if now != seen {
                    seen = now;
                    break;
                }
                if spins < IDLE_SPINS {
                    std::hint::spin_loop();
                    spins += 1;
                    continue;
                }
                // Announce the park, then look again: a `go` bumped after this store sees the
                // flag and unparks; one bumped before it is seen here.
                self.parked[t].store(true, Ordering::SeqCst);
                if self.go.load(Ordering::SeqCst) == seen {
                    std::thread::park();
                }
                self.parked[t].store(false, Ordering::SeqCst);
            }
            if self.stop.load(Ordering::SeqCst) {
                return;
            }
            // SAFETY: see `TeamState::job`.
            let job = unsafe { (*self.job.get()).expect("a job is set before `go`") };
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| unsafe {
                (*job.0)(t, self.threads, &self.barrier)
            }));
            if r.is_err() {
                self.barrier.poisoned.store(true, Ordering::SeqCst);
                self.panicked.store(true, Ordering::SeqCst);
            }
            self.done.fetch_add(1, Ordering::Release);
        }
    }
}

impl Drop for Team {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        self.state.go.fetch_add(1, Ordering::SeqCst);
        for w in &self.workers {
            w.thread().unpark();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// Thread `t` of `nt`'s share of `0..n`.
fn share(n: usize, t: usize, nt: usize) -> Range<usize> {
    n * t / nt..n * (t + 1) / nt
}

/// The part of `rows` that falls in `seg`, shifted to start at 0 within `seg`.
fn within(rows: &Range<usize>, seg: Range<usize>) -> Range<usize> {
    let s = rows.start.max(seg.start);
    let e = rows.end.min(seg.end).max(s);
    s - seg.start..e - seg.start
}

/// A matrix as one step reads it.
enum MatrixView<'a> {
    F32 { w: &'a [f32], k: usize },
    Bf16 { w: &'a [half::bf16], k: usize },
    F16 { w: &'a [half::f16], k: usize },
    Quant(&'a QWeight),
    Panels { w: &'a [f32], k: usize },
}

/// One thread's copy of the row a matrix multiplies, and its 8-bit blocks when some matrix is
/// quantized.
struct Activation {
    f: Vec<f32>,
    q: Vec<Q8Block>,
    quantize: bool,
}

impl Activation {
    fn set_from(&mut self, x: &[f32]) {
        self.f.clear();
        self.f.extend_from_slice(x);
        self.quantized();
    }

    fn quantized(&mut self) {
        if self.quantize {
            quantize_input(&self.f, &mut self.q);
        }
    }
}

impl MatrixView<'_> {
    /// `out[i] = W[rows.start + i] . x`.
    fn rows(&self, dot: DotFn, x: &Activation, rows: Range<usize>, out: &mut [f32]) {
        match self {
            MatrixView::F32 { w, k } => {
                for (j, y) in rows.zip(out) {
                    *y = dot(&x.f, &w[j * k..(j + 1) * k]);
                }
            }
            MatrixView::Bf16 { w, k } => {
                let dot = crate::ops::matvec::dot_bf16_fn();
                for (j, y) in rows.zip(out) {
                    *y = dot(&x.f, &w[j * k..(j + 1) * k]);
                }
            }
            MatrixView::F16 { w, k } => {
                let dot = crate::ops::matvec::dot_f16_fn();
                for (j, y) in rows.zip(out) {
                    *y = dot(&x.f, &w[j * k..(j + 1) * k]);
                }
            }
            MatrixView::Quant(q) => q.dot_rows(&x.q, rows, out),
            MatrixView::Panels { w, k } => crate::ops::matvec::panel_rows(w, *k, &x.f, rows, out),
        }
    }
}

/// `out = x / sqrt(mean(x^2) + eps) * w`, summing in f64 like the tensor path.
fn rms_norm(x: &[f32], w: &[f32], eps: f64, out: &mut Vec<f32>) {
    let ms = x.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / x.len() as f64;
    let r = (ms + eps).sqrt().recip() as f32;
    out.clear();
    out.extend(x.iter().zip(w).map(|(&v, &w)| v * r * w));
}

/// Rotate-half RoPE of one head in place.
fn rope(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    let h = x.len() / 2;
    for i in 0..h {
        let (a, b) = (x[i], x[i + h]);
        x[i] = a * cos[i] - b * sin[i];
        x[i + h] = b * cos[i] + a * sin[i];
    }
}

/// The per-layer key and value buffers, `[kv_heads, capacity, head_dim]` each.
struct LayerCache {
    k: Shared,
    v: Shared,
}

/// Fused single-token decoding for a Llama base model; see the module comment.
pub(crate) struct FusedDecoder {
    model: Llama,
    embed: Matrix,
    head: Matrix,
    final_norm: Vec<f32>,
    layers: Vec<Layer>,
    quantized: bool,
    cache: Vec<LayerCache>,
    capacity: usize,
    len: usize,
    /// Spawned at the first step (deciding whether a model can be decoded here is cheap).
    team: Option<Team>,
    /// The head's screen for greedy steps, once looked for (`Some(None)`: none).
    screen: Option<Option<Arc<HeadScreen>>>,
    threads: usize,
    // Step buffers.
    x: Shared,
    qkv: Shared,
    attn: Shared,
    ffn: Shared,
    logits: Shared,
}

impl FusedDecoder {
    /// The decoder for `model` with weights `p`, or `None` when some weight is in a form it does
    /// not read (then the tensor path decodes).
    pub(crate) fn new(model: &Llama, p: &ParamStore) -> Option<Self> {
        let c = &model.cfg;
        let (d, f, hd) = (c.hidden_size, c.intermediate_size, c.head_dim);
        let (nq, nkv) = (c.num_attention_heads * hd, c.num_key_value_heads * hd);
        if c.num_key_value_heads == 0
            || !c.num_attention_heads.is_multiple_of(c.num_key_value_heads)
        {
            return None;
        }
        let embed = Matrix::of(p, "model.embed_tokens.weight", c.vocab_size, d)?;
        let head = match c.tie_word_embeddings {
            true => Matrix::of(p, "model.embed_tokens.weight", c.vocab_size, d)?,
            false => Matrix::of(p, "lm_head.weight", c.vocab_size, d)?,
        };
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let pre = format!("model.layers.{i}");
            let proj = |m: &str, n, k| Projection::of(p, &format!("{pre}.{m}"), n, k);
            layers.push(Layer {
                attn_norm: vector(p, &format!("{pre}.input_layernorm.weight"), d)?,
                ffn_norm: vector(p, &format!("{pre}.post_attention_layernorm.weight"), d)?,
                q: proj("self_attn.q_proj", nq, d)?,
                k: proj("self_attn.k_proj", nkv, d)?,
                v: proj("self_attn.v_proj", nkv, d)?,
                o: proj("self_attn.o_proj", d, nq)?,
                gate: proj("mlp.gate_proj", f, d)?,
                up: proj("mlp.up_proj", f, d)?,
                down: proj("mlp.down_proj", d, f)?,
            });
        }
        let quantized = head.is_quantized()
            || layers.iter().any(|l| {
                [&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down]
                    .iter()
                    .any(|p| p.w.is_quantized())
            });
        Some(Self {
            model: model.clone(),
            embed,
            head,
            final_norm: vector(p, "model.norm.weight", d)?,
            layers,
            quantized,
            cache: vec![],
            capacity: 0,
            len: 0,
            team: None,
            screen: None,
            threads: rayon::current_num_threads().max(1),
            x: Shared::zeros(d),
            qkv: Shared::zeros(nq + 2 * nkv),
            attn: Shared::zeros(nq),
            ffn: Shared::zeros(f),
            logits: Shared::zeros(c.vocab_size),
        })
    }

    /// Take over the positions already in `cache` (the prompt, run by the tensor path).
    pub(crate) fn with_cache(mut self, cache: &KvCache) -> Result<Self> {
        let c = &self.model.cfg;
        let (hkv, hd, len) = (c.num_key_value_heads, c.head_dim, cache.len());
        self.reserve(len.max(1))?;
        for (i, lc) in self.cache.iter_mut().enumerate() {
            let Some((k, v)) = cache.layer(i)? else {
                if len > 0 {
                    return Err(Error::invalid("KV cache: a layer has no entries"));
                }
                continue;
            };
            for (src, dst) in [(k, &mut lc.k), (v, &mut lc.v)] {
                // [1, hkv, len, hd]
                let src = src.to_dtype(DType::F32)?.squeeze(0)?;
                let src = src.flatten_all()?.to_vec1::<f32>()?;
                let dst = dst.get_mut();
                for g in 0..hkv {
                    let at = g * self.capacity * hd;
                    dst[at..at + len * hd].copy_from_slice(&src[g * len * hd..(g + 1) * len * hd]);
                }
            }
        }
        self.len = len;
        Ok(self)
    }

    /// Room for `need` positions in every layer's cache (doubling, copying what is there).
    fn reserve(&mut self, need: usize) -> Result<()> {
        if need <= self.capacity && !self.cache.is_empty() {
            return Ok(());
        }
        let c = &self.model.cfg;
        let (hkv, hd) = (c.num_key_value_heads, c.head_dim);
        let cap = need.next_power_of_two().max(64);
        let (old_cap, len) = (self.capacity, self.len);
        let mut fresh = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let mut lc = LayerCache {
                k: Shared::zeros(hkv * cap * hd),
                v: Shared::zeros(hkv * cap * hd),
            };
            if let Some(old) = self.cache.get_mut(i) {
                for (src, dst) in [(&mut old.k, &mut lc.k), (&mut old.v, &mut lc.v)] {
                    let (src, dst) = (src.get_mut(), dst.get_mut());
                    for g in 0..hkv {
                        let (s, t) = (g * old_cap * hd, g * cap * hd);
                        dst[t..t + len * hd].copy_from_slice(&src[s..s + len * hd]);
                    }
                }
            }
            fresh.push(lc);
        }
        self.cache = fresh;
        self.capacity = cap;
        Ok(())
    }

    /// Append `token` at the next position; the logits `[vocab]` of the token after it.
    pub(crate) fn step(&mut self, token: u32) -> Result<Vec<f32>> {
        match self.advance(token, false)? {
            Next::Logits(v) => Ok(v),
            Next::Token(_) => unreachable!("asked for logits"),
        }
    }

    /// Append `token` at the next position; the greedy token after it (the argmax of `step`'s
    /// logits, computed through the head's screen when it is dense: see [`HeadScreen`]).
    pub(crate) fn step_greedy(&mut self, token: u32) -> Result<u32> {
        match self.advance(token, true)? {
            Next::Token(t) => Ok(t),
            Next::Logits(v) => Ok(crate::generate::argmax(&v)),
        }
    }

    fn advance(&mut self, token: u32, greedy: bool) -> Result<Next> {
        let screen = match greedy {
            true => self.screen()?,
            false => None,
        };
        let c = &self.model.cfg;
        let (d, vocab, eps) = (c.hidden_size, c.vocab_size, c.rms_norm_eps);
        if token as usize >= vocab {
            return Err(Error::invalid(format!(
                "token id {token} is outside the vocabulary ({vocab})"
            )));
        }
        self.reserve(self.len + 1)?;
        if self.team.is_none() {
            self.team = Some(Team::new(self.threads));
        }
        let pos = self.len;
        let (cos, sin) = self.model.rope_window(pos)?;
        // The token's embedding row.
        {
            let x = self.x.get_mut();
            match &self.embed {
                Matrix::Dense { t, .. } => {
                    let row = t
                        .get(token as usize)?
                        .to_dtype(DType::F32)?
                        .to_vec1::<f32>()?;
                    x.copy_from_slice(&row);
                }
                Matrix::Quant(q) => q.dequantize_row(token as usize, x),
                Matrix::Panels(q) => q.row_into(token as usize, x)?,
            }
        }
        // Hold every f32 matrix's storage for the step and read it in place.
        let mut matrices: Vec<&Matrix> = Vec::with_capacity(self.layers.len() * 7 + 1);
        for l in &self.layers {
            matrices.extend([
                &l.q.w, &l.k.w, &l.v.w, &l.o.w, &l.gate.w, &l.up.w, &l.down.w,
            ]);
        }
        matrices.push(&self.head);
        let guards: Vec<_> = matrices
            .iter()
            .map(|m| match m {
                Matrix::Dense { t, .. } => Some(t.storage_and_layout()),
                Matrix::Quant(_) | Matrix::Panels(_) => None,
            })
            .collect();
        let mut views = Vec::with_capacity(matrices.len());
        for (m, g) in matrices.iter().zip(&guards) {
            views.push(match (m, g) {
                (Matrix::Dense { n, k, .. }, Some((storage, layout))) => {
                    let (at, len, k) = (layout.start_offset(), n * k, *k);
                    match &**storage {
                        Storage::Cpu(CpuStorage::F32(all)) => MatrixView::F32 {
                            w: &all[at..at + len],
                            k,
                        },
                        Storage::Cpu(CpuStorage::BF16(all)) => MatrixView::Bf16 {
                            w: &all[at..at + len],
                            k,
                        },
                        Storage::Cpu(CpuStorage::F16(all)) => MatrixView::F16 {
                            w: &all[at..at + len],
                            k,
                        },
                        _ => {
                            return Err(Error::invalid(
                                "fused decoding: a weight left f32/bf16/f16 CPU storage",
                            ))
                        }
                    }
                }
                (Matrix::Quant(q), _) => MatrixView::Quant(q),
                (Matrix::Panels(q), _) => MatrixView::Panels {
                    w: q.panel_values().expect("panels, as `Matrix::of` checked"),
                    k: q.dims().1,
                },
                (Matrix::Dense { .. }, None) => unreachable!("a guard for each dense matrix"),
            });
        }
        let team = self.team.as_ref().expect("spawned above");
        let this = &*self;
        let head = match &screen {
            Some(s) => &MatrixView::Quant(&s.q),
            None => &views[views.len() - 1],
        };
        let job = |t: usize, nt: usize, barrier: &SpinBarrier| {
            this.run(t, nt, &views, head, pos, &cos, &sin, barrier)
        };
        team.run(&job);
        // SAFETY: the team is done with the step's buffers.
        let token = screen
            .as_ref()
            .map(|s| unsafe { self.screened_argmax(s, &views[views.len() - 1]) });
        drop(views);
        drop(guards);
        self.len += 1;
        if let Some(token) = token {
            return Ok(Next::Token(token));
        }
        let mut logits = self.logits.get_mut().to_vec();
        if let Matrix::Quant(q) = &self.head {
            // As `ops::quantized_logits` on the tensor path: the 8-bit activations must not
            // flip a near-tie.
            let mut xn = Vec::new();
            rms_norm(self.x.get_mut(), &self.final_norm, eps, &mut xn);
            rescore_near_top(&mut logits, &xn, |j, row| {
                q.dequantize_row(j, row);
                Ok(())
            })?;
        }
        debug_assert_eq!(self.x.len(), d);
        Ok(match greedy {
            true => Next::Token(crate::generate::argmax(&logits)),
            false => Next::Logits(logits),
        })
    }

    /// The head's screen when greedy steps can use one (a dense head; made at the first).
    fn screen(&mut self) -> Result<Option<Arc<HeadScreen>>> {
        if self.screen.is_none() {
            self.screen = Some(match (&self.head, head_screen::enabled()) {
                (Matrix::Dense { t, .. }, true) => HeadScreen::of(t)?,
                (Matrix::Panels(q), true) => HeadScreen::of_panels(q)?,
                _ => None,
            });
        }
        Ok(self.screen.clone().flatten())
    }

    /// The exact argmax of the dense `head` over the step's screen scores (in `logits`): the
    /// rows the screen cannot rule out are computed as the full head computes them.
    ///
    /// # Safety
    /// No other thread touches the step's buffers.
    unsafe fn screened_argmax(&self, screen: &HeadScreen, head: &MatrixView) -> u32 {
        let c = &self.model.cfg;
        let (d, vocab) = (c.hidden_size, c.vocab_size);
        let mut act = Activation {
            f: Vec::with_capacity(d),
            q: Vec::new(),
            quantize: true,
        };
        rms_norm(
            self.x.slice(0..d),
            &self.final_norm,
            c.rms_norm_eps,
            &mut act.f,
        );
        act.quantized();
        let dot = dot_fn();
        let scores = self.logits.slice_mut(0..vocab);
        let Some(rows) = screen.candidates(scores, &act.f, &act.q) else {
            head.rows(dot, &act, 0..vocab, scores);
            return crate::generate::argmax(scores);
        };
        let (mut best, mut best_logit) = (rows[0], f32::NEG_INFINITY);
        let mut y = [0f32];
        for j in rows {
            head.rows(dot, &act, j..j + 1, &mut y);
            // First of equal maxima, as `generate::argmax`.
            if y[0] > best_logit {
                (best, best_logit) = (j, y[0]);
            }
        }
        best as u32
    }

    /// `x[rows] += W[rows] . act (+ bias[rows])`: this thread's rows of a projection back into
    /// the residual stream.
    ///
    /// # Safety
    /// No other thread touches `x[rows]` until the caller's next barrier.
    #[allow(clippy::too_many_arguments)]
    unsafe fn add_to_residual(
        &self,
        w: &MatrixView,
        proj: &Projection,
        dot: DotFn,
        act: &Activation,
        rows: Range<usize>,
        tmp: &mut [f32],
    ) {
        let out = &mut tmp[..rows.len()];
        w.rows(dot, act, rows.clone(), out);
        proj.add_bias(out, rows.clone());
        let x = self.x.slice_mut(rows);
        x.iter_mut().zip(out.iter()).for_each(|(x, y)| *x += y);
    }

    /// Thread `t` of `nt`'s part of one step.
    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        t: usize,
        nt: usize,
        views: &[MatrixView],
        head: &MatrixView,
        pos: usize,
        cos: &[f32],
        sin: &[f32],
        barrier: &SpinBarrier,
    ) {
        let c = &self.model.cfg;
        let (d, f, hd, eps) = (
            c.hidden_size,
            c.intermediate_size,
            c.head_dim,
            c.rms_norm_eps,
        );
        let (nh, hkv) = (c.num_attention_heads, c.num_key_value_heads);
        let (nq, nkv) = (nh * hd, hkv * hd);
        let group = nh / hkv;
        let dot = dot_fn();
        let scale = 1.0 / (hd as f32).sqrt();
        let len = pos + 1;
        let cap = self.capacity;
        let mut act = Activation {
            f: Vec::with_capacity(f.max(d)),
            q: Vec::new(),
            quantize: self.quantized,
        };
        let mut tmp = vec![0f32; 2 * f.max(d)];
        let (mut qh, mut scores) = (vec![0f32; hd], vec![0f32; len]);
        // SAFETY (every `slice`/`slice_mut` below): each phase writes only this thread's share
        // (`share`) of a buffer and reads what the previous phases wrote, with a barrier between.
        unsafe {
            for (l, (layer, w)) in self.layers.iter().zip(views.chunks_exact(7)).enumerate() {
                let [wq, wk, wv, wo, wg, wu, wd] = w else {
                    unreachable!()
                };
                let cache = &self.cache[l];
                // Attention: norm, q/k/v rows of this thread.
                rms_norm(self.x.slice(0..d), &layer.attn_norm, eps, &mut act.f);
                act.quantized();
                let rows = share(nq + 2 * nkv, t, nt);
                for (proj, view, seg) in [
                    (&layer.q, wq, 0..nq),
                    (&layer.k, wk, nq..nq + nkv),
                    (&layer.v, wv, nq + nkv..nq + 2 * nkv),
                ] {
                    let r = within(&rows, seg.clone());
                    if r.is_empty() {
                        continue;
                    }
                    let out = self.qkv.slice_mut(seg.start + r.start..seg.start + r.end);
                    view.rows(dot, &act, r.clone(), out);
                    proj.add_bias(out, r);
                }
                barrier.wait();
                // This thread's key/value heads into the cache, keys rotated.
                for g in share(hkv, t, nt) {
                    let at = (g * cap + pos) * hd;
                    let k = cache.k.slice_mut(at..at + hd);
                    k.copy_from_slice(self.qkv.slice(nq + g * hd..nq + (g + 1) * hd));
                    rope(k, cos, sin);
                    let v = cache.v.slice_mut(at..at + hd);
                    v.copy_from_slice(self.qkv.slice(nq + nkv + g * hd..nq + nkv + (g + 1) * hd));
                }
                barrier.wait();
                // This thread's query heads over every cached position.
                for h in share(nh, t, nt) {
                    qh.copy_from_slice(self.qkv.slice(h * hd..(h + 1) * hd));
                    rope(&mut qh, cos, sin);
                    let g = h / group;
                    let keys = cache.k.slice(g * cap * hd..(g * cap + len) * hd);
                    let values = cache.v.slice(g * cap * hd..(g * cap + len) * hd);
                    let mut max = f32::NEG_INFINITY;
                    for (s, k) in scores.iter_mut().zip(keys.chunks_exact(hd)) {
                        *s = dot(&qh, k) * scale;
                        max = max.max(*s);
                    }
                    let mut sum = 0f32;
                    for s in scores.iter_mut() {
                        *s = (*s - max).exp();
                        sum += *s;
                    }
                    let out = self.attn.slice_mut(h * hd..(h + 1) * hd);
                    out.fill(0.0);
                    for (&s, v) in scores.iter().zip(values.chunks_exact(hd)) {
                        let p = s / sum;
                        out.iter_mut().zip(v).for_each(|(o, v)| *o += p * v);
                    }
                }
                barrier.wait();
                // Output projection into the residual stream, this thread's rows.
                act.set_from(self.attn.slice(0..nq));
                self.add_to_residual(wo, &layer.o, dot, &act, share(d, t, nt), &mut tmp);
                barrier.wait();
                // Feed-forward: gate and up rows of this thread, silu(gate) * up.
                rms_norm(self.x.slice(0..d), &layer.ffn_norm, eps, &mut act.f);
                act.quantized();
                let r = share(f, t, nt);
                let n = r.len();
                let (g, u) = tmp[..2 * n].split_at_mut(n);
                wg.rows(dot, &act, r.clone(), g);
                wu.rows(dot, &act, r.clone(), u);
                layer.gate.add_bias(g, r.clone());
                layer.up.add_bias(u, r.clone());
                let h = self.ffn.slice_mut(r);
                for ((h, &g), &u) in h.iter_mut().zip(g.iter()).zip(u.iter()) {
                    *h = g / (1.0 + (-g).exp()) * u;
                }
                barrier.wait();
                act.set_from(self.ffn.slice(0..f));
                self.add_to_residual(wd, &layer.down, dot, &act, share(d, t, nt), &mut tmp);
                barrier.wait();
            }
            // Final norm and this thread's rows of the head.
            rms_norm(self.x.slice(0..d), &self.final_norm, eps, &mut act.f);
            act.quantize |= matches!(head, MatrixView::Quant(_));
            act.quantized();
            let r = share(c.vocab_size, t, nt);
            head.rows(dot, &act, r.clone(), self.logits.slice_mut(r));
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::GgmlDType;
    use candle_core::Device;

    use super::*;
    use crate::model::testing::{random_params, tiny_llama_config};
    use crate::peft::DeltaSet;

    /// Blocks need rows of 32: d = 192, 6 heads of 32 sharing 2 KV heads (groups of 3, as in
    /// SmolLM2), FFN 256.
    fn model(tie: bool, bias: bool) -> Result<(Llama, ParamStore)> {
        let mut cfg = tiny_llama_config();
        cfg.vocab_size = 96;
        cfg.hidden_size = 192;
        cfg.intermediate_size = 256;
        cfg.num_attention_heads = 6;
        cfg.num_key_value_heads = 2;
        cfg.head_dim = 32;
        cfg.max_position_embeddings = 128;
        cfg.tie_word_embeddings = tie;
        cfg.attention_bias = bias;
        cfg.mlp_bias = bias;
        let p = random_params(&Llama::expected_params(&cfg), 3, DType::F32)?;
        // Smaller matrices keep the activations in a sane range through the layers.
        let mut scaled = ParamStore::new();
        for (name, t) in p.iter() {
            let t = t.tensor();
            let t = if t.rank() == 2 { (t * 0.2)? } else { t.clone() };
            scaled.insert_frozen(name, t);
        }
        Ok((Llama::new(cfg, &Device::Cpu)?, scaled))
    }

    /// Past 64 positions the cache grows (copying what it holds).
    const PROMPT: [u32; 8] = [3, 17, 40, 2, 91, 5, 5, 60];

    fn continuation() -> Vec<u32> {
        (0..70).map(|i| (i * 37 + 11) % 96).collect()
    }

    /// Per step, the logits of the tensor path (`integer`: with the integer kernels, as generation
    /// runs it) and of the fused decoder on `threads` threads, for the same tokens.
    fn both(
        m: &Llama,
        p: &ParamStore,
        integer: bool,
        threads: usize,
    ) -> Result<Vec<(Vec<f32>, Vec<f32>)>> {
        let none = (DeltaSet::none(), ParamStore::new());
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("thread pool");
        let run = || -> Result<Vec<(Vec<f32>, Vec<f32>)>> {
            let mut cache = KvCache::new(m.cfg.num_hidden_layers);
            let ids = Tensor::new(&PROMPT, &Device::Cpu)?.unsqueeze(0)?;
            m.forward_last(p, &none.0, &none.1, &ids, &mut cache)?;
            let mut fused = FusedDecoder::new(m, p)
                .expect("weights the fused decoder reads")
                .with_cache(&cache)?;
            let mut out = vec![];
            for id in continuation() {
                let ids = Tensor::new(&[id], &Device::Cpu)?.unsqueeze(0)?;
                let want = m.forward_last(p, &none.0, &none.1, &ids, &mut cache)?;
                out.push((want.flatten_all()?.to_vec1::<f32>()?, fused.step(id)?));
            }
            Ok(out)
        };
        pool.install(|| match integer {
            true => crate::ops::with_integer_kernels(run),
            false => run(),
        })
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    /// f32 compute on f32, bf16 or f16 weights (the tensor path widens half precision too).
    #[test]
    fn equals_the_tensor_path_in_f32_on_any_number_of_threads() -> Result<()> {
        for (tie, bias) in [(false, false), (true, true)] {
            let (m, p) = model(tie, bias)?;
            for (threads, dtype) in [
                (1, DType::F32),
                (2, DType::F32),
                (3, DType::F32),
                (2, DType::BF16),
                (3, DType::F16),
            ] {
                let p = p.frozen_matrices_to(dtype)?;
                for (step, (want, got)) in both(&m, &p, false, threads)?.iter().enumerate() {
                    let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
                    let diff = max_diff(want, got);
                    assert!(
                        diff <= 1e-5 * (1.0 + scale),
                        "tie {tie} bias {bias}, {dtype:?}, {threads} threads, step {step}: max \
                         |diff| {diff} (logits up to {scale})"
                    );
                }
            }
        }
        Ok(())
    }

    /// Weights kept as f32 panels (the inference layout) give the f32 weights' logits on the
    /// tensor path and in the fused decoder (3 threads: shares that split panels), and greedy
    /// steps through the screen made from the panels pick the full head's argmax.
    #[test]
    fn packed_weights_give_the_f32_logits_on_both_paths() -> Result<()> {
        for (tie, bias) in [(false, false), (true, true)] {
            let (m, p) = model(tie, bias)?;
            let packed = p.clone().into_packed()?;
            assert!(packed
                .quantized("model.layers.1.mlp.down_proj.weight")
                .is_some());
            for threads in [1, 3] {
                let dense = both(&m, &p, false, threads)?;
                let panels = both(&m, &packed, false, threads)?;
                for (step, ((want, _), (tensor, fused))) in dense.iter().zip(&panels).enumerate() {
                    let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
                    for (what, got) in [("tensor path", tensor), ("fused", fused)] {
                        let diff = max_diff(want, got);
                        assert!(
                            diff <= 1e-5 * (1.0 + scale),
                            "tie {tie} bias {bias}, {threads} threads, step {step}, {what}: \
                             max |diff| {diff} (logits up to {scale})"
                        );
                    }
                }
            }
            let none = (DeltaSet::none(), ParamStore::new());
            let mut cache = KvCache::new(m.cfg.num_hidden_layers);
            let ids = Tensor::new(&PROMPT, &Device::Cpu)?.unsqueeze(0)?;
            m.forward_last(&packed, &none.0, &none.1, &ids, &mut cache)?;
            let new = || FusedDecoder::new(&m, &packed).expect("panels");
            let (mut full, mut greedy) = (new().with_cache(&cache)?, new().with_cache(&cache)?);
            assert!(greedy.screen()?.is_some(), "a head in panels has a screen");
            for (step, id) in continuation().into_iter().enumerate() {
                let want = crate::generate::argmax(&full.step(id)?);
                assert_eq!(greedy.step_greedy(id)?, want, "tie {tie}, step {step}");
            }
        }
        Ok(())
    }

    /// With Q8_0/Q4_1 blocks both paths quantize the activations to 8 bits, where a different
    /// f32 summation order can flip an element's rounding: the two are not bit-equal, so each is
    /// held to the exact product (the dequantized weights in f32) and the fused decoder must be
    /// as close to it as the tensor path is.
    #[test]
    fn on_quantized_blocks_is_as_close_to_the_exact_product_as_the_tensor_path() -> Result<()> {
        for (tie, bias) in [(false, false), (true, true)] {
            let (m, p) = model(tie, bias)?;
            for q in [GgmlDType::Q8_0, GgmlDType::Q4_1] {
                let pq = p.quantize_matrices(q)?;
                let exact = both(&m, &pq.dequantized()?, false, 2)?;
                let int8 = both(&m, &pq, true, 2)?;
                let (mut tensor_err, mut fused_err) = (0f32, 0f32);
                for ((x, _), (t, f)) in exact.iter().zip(&int8) {
                    let (te, fe) = (max_diff(t, x), max_diff(f, x));
                    tensor_err += te;
                    fused_err += fe;
                    assert!(
                        fe <= 3.0 * te + 0.05,
                        "{q:?}: one step off by {fe} (tensor path {te})"
                    );
                }
                assert!(
                    fused_err <= 1.5 * tensor_err + 1e-3,
                    "tie {tie} bias {bias} {q:?}: mean error {} vs the tensor path's {}",
                    fused_err / exact.len() as f32,
                    tensor_err / exact.len() as f32
                );
                assert!(tensor_err > 0.0, "the integer kernels ran");
            }
        }
        Ok(())
    }

    /// Greedy steps through the head's Q8_0 screen give exactly the argmax of the full logits,
    /// including where the leading logits nearly tie (a head whose rows come in near-equal pairs).
    #[test]
    fn greedy_steps_through_the_screen_are_the_argmax_of_the_full_head() -> Result<()> {
        let (m, p) = model(true, false)?;
        let mut rows = p.get("model.embed_tokens.weight")?.to_vec2::<f32>()?;
        for j in (0..rows.len()).step_by(2) {
            rows[j + 1] = rows[j].iter().map(|v| v * (1.0 + 1e-6)).collect();
        }
        let mut paired = ParamStore::new();
        for (name, t) in p.iter() {
            paired.insert_frozen(name, t.tensor().clone());
        }
        paired.insert_frozen(
            "model.embed_tokens.weight",
            Tensor::new(rows, &Device::Cpu)?,
        );
        for (threads, dtype) in [(1, DType::F32), (2, DType::F32), (3, DType::BF16)] {
            for p in [&p, &paired] {
                let p = p.frozen_matrices_to(dtype)?;
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .expect("thread pool");
                pool.install(|| -> Result<()> {
                    let none = (DeltaSet::none(), ParamStore::new());
                    let mut cache = KvCache::new(m.cfg.num_hidden_layers);
                    let ids = Tensor::new(&PROMPT, &Device::Cpu)?.unsqueeze(0)?;
                    m.forward_last(&p, &none.0, &none.1, &ids, &mut cache)?;
                    let new = || FusedDecoder::new(&m, &p).expect("dense weights");
                    let mut full = new().with_cache(&cache)?;
                    let mut greedy = new().with_cache(&cache)?;
                    assert!(greedy.screen()?.is_some(), "a dense head has a screen");
                    // Teacher-forced, so that every step sees a different state.
                    for (step, id) in continuation().into_iter().enumerate() {
                        let want = crate::generate::argmax(&full.step(id)?);
                        assert_eq!(
                            greedy.step_greedy(id)?,
                            want,
                            "{dtype:?}, {threads} threads, step {step}"
                        );
                    }
                    Ok(())
                })?;
            }
        }
        Ok(())
    }

    #[test]
    fn a_panic_on_any_thread_reaches_the_caller_and_the_team_goes_on() {
        let team = Team::new(3);
        for bad in [0, 1, 2] {
            let job = |t: usize, _: usize, b: &SpinBarrier| {
                b.wait();
                assert_ne!(t, bad, "thread {t} fails");
                b.wait();
            };
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| team.run(&job)));
            assert!(r.is_err(), "thread {bad}'s panic was lost");
        }
        let hits = AtomicUsize::new(0);
        let job = |t: usize, nt: usize, b: &SpinBarrier| {
            assert_eq!(nt, 3);
            hits.fetch_add(t + 1, Ordering::SeqCst);
            b.wait();
        };
        team.run(&job);
        assert_eq!(hits.load(Ordering::SeqCst), 6);
    }

    /// Generation with mergeable deltas decodes fused on merged weights; the others stay on the
    /// tensor path. Both must give the tensor path's logits with the deltas applied.
    #[test]
    fn generation_with_deltas_matches_the_tensor_path() -> Result<()> {
        use crate::model::Arch;
        use crate::peft::lora::LoraConfig;
        use crate::peft::prefix::PrefixTuningConfig;
        use crate::peft::DeltaConfig;
        let (m, p) = model(false, true)?;
        let arch = Arch::Llama(m.cfg.clone());
        let configs = [
            (
                DeltaConfig::Lora(LoraConfig::new(4, 8.0, &["q_proj", "v_proj", "down_proj"])),
                true,
            ),
            (
                DeltaConfig::PrefixTuning(PrefixTuningConfig {
                    num_virtual_tokens: 2,
                    prefix_projection: false,
                    encoder_hidden_size: 8,
                }),
                false,
            ),
        ];
        for (cfg, fused) in configs {
            let a = cfg.init(&arch, &p, 5)?;
            // Away from the identity (LoRA's B starts at zero).
            let mut dp = ParamStore::new();
            for (i, (name, t)) in a.params.iter().enumerate() {
                let t = t.tensor();
                let noise = crate::ops::gradcheck::randn_f64(t.dims(), 40 + i as u64, 0.2)?;
                dp.insert_frozen(name, (t + noise.to_dtype(t.dtype())?)?);
            }
            let d = a.attach(&arch, &p)?;
            let mut decoder = crate::generate::Decoder::new(&m, &p, &d, &dp);
            assert_eq!(decoder.is_fused(), fused, "{}", cfg.method());
            let mut cache = KvCache::new(m.cfg.num_hidden_layers);
            let ids = Tensor::new(&PROMPT, &Device::Cpu)?.unsqueeze(0)?;
            let first = m.forward_last(&p, &d, &dp, &ids, &mut cache)?;
            let got = decoder.next_logits(&PROMPT)?;
            assert!(max_diff(&first.flatten_all()?.to_vec1::<f32>()?, &got) < 1e-4);
            for (step, id) in continuation().into_iter().take(12).enumerate() {
                let ids = Tensor::new(&[id], &Device::Cpu)?.unsqueeze(0)?;
                let want = m.forward_last(&p, &d, &dp, &ids, &mut cache)?;
                let want = want.flatten_all()?.to_vec1::<f32>()?;
                let got = decoder.next_logits(&[id])?;
                let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
                let diff = max_diff(&want, &got);
                assert!(
                    diff <= 1e-4 * (1.0 + scale),
                    "{} step {step}: max |diff| {diff}",
                    cfg.method()
                );
            }
        }
        Ok(())
    }

    #[test]
    fn other_weight_forms_are_left_to_the_tensor_path() -> Result<()> {
        let (m, p) = model(false, false)?;
        assert!(FusedDecoder::new(&m, &p).is_some());
        assert!(FusedDecoder::new(&m, &p.frozen_matrices_to(DType::BF16)?).is_some());
        assert!(FusedDecoder::new(&m, &p.clone().into_packed()?).is_some());
        assert!(FusedDecoder::new(&m, &p.to_dtype(DType::F64)?).is_none());
        // Q4_0 blocks have no integer kernel here.
        assert!(FusedDecoder::new(&m, &p.quantize_matrices(GgmlDType::Q4_0)?).is_none());
        Ok(())
    }
}
