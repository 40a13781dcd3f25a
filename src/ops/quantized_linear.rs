//! A linear map by a frozen *quantized* weight (GGUF blocks), with a backward: QLoRA-style training
//! on a base that stays at its file size in memory.
//!
//! The weight lives inside the op, not in the graph, as the GGUF's raw blocks. Each product walks
//! the weight in tiles of rows: a tile is dequantized into a small f32 buffer and multiplied with
//! `gemm`, so the matmul runs at f32 speed on exactly the dequantized weight (gradients equal the
//! dequantized f32 model's up to summation order), and memory holds the blocks plus one tile per
//! thread (and, for `g W`, one `[rows, in]` partial sum per thread).
//! The backward is the same op in the other orientation (`g W`), itself differentiable, so
//! second-order MAML works on a quantized base too.

use std::sync::Arc;

use candle_core::quantized::k_quants::{
    BlockQ2K, BlockQ3K, BlockQ4K, BlockQ4_0, BlockQ5K, BlockQ5_0, BlockQ5_1, BlockQ6K, GgmlType,
};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// A frozen weight `[out, in]` in a layout only the ops here read: GGUF blocks (quantized), or
/// f32 values already in the panel kernel's layout.
#[derive(Clone)]
pub struct QuantizedWeight {
    /// Unique to these values (clones share it): caches keyed on a weight (a head's screen) use
    /// it, where an address could be reused by the next weight.
    id: u64,
    storage: Storage,
    /// The block type; `F32` for panels.
    dtype: GgmlDType,
    rows: usize,
    cols: usize,
}

/// How a [`QuantizedWeight`] holds its values.
#[derive(Clone)]
enum Storage {
    /// Rows of whole blocks, exactly as a GGUF file stores them.
    Blocks(Arc<Vec<u8>>),
    /// f32 values in the layout of `ops::panel_gemm`: `ceil(rows / 16)` panels of `[cols][16]`,
    /// the last one's missing rows zero. Products read them in place, where a row-major f32
    /// weight is transposed into panels on every call (the inference layout of
    /// `BaseStorage::Packed`: same values, no transposes).
    Panels(Arc<Vec<f32>>),
}

fn fresh_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

impl std::fmt::Debug for QuantizedWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "QuantizedWeight({}, [{}, {}])",
            self.kind(),
            self.rows,
            self.cols
        )
    }
}

fn err(msg: impl Into<String>) -> candle_core::Error {
    candle_core::Error::Msg(msg.into())
}

/// Whether rows of this block type can be dequantized here.
fn supported(dtype: GgmlDType) -> bool {
    use GgmlDType as G;
    matches!(
        dtype,
        G::F32
            | G::F16
            | G::Q4_0
            | G::Q4_1
            | G::Q5_0
            | G::Q5_1
            | G::Q8_0
            | G::Q2K
            | G::Q3K
            | G::Q4K
            | G::Q5K
            | G::Q6K
    )
}

/// Dequantize whole blocks `src` (raw bytes of blocks of type `B`) into `dst`.
fn blocks_to_f32<B: GgmlType>(src: &[u8], dst: &mut [f32]) -> Result<()> {
    let size = std::mem::size_of::<B>();
    if !src.len().is_multiple_of(size)
        || !(src.as_ptr() as usize).is_multiple_of(std::mem::align_of::<B>())
    {
        return Err(err("quantized_linear: misaligned block data"));
    }
    // SAFETY: `B` is a `repr(C)` block of plain integers and f16s, valid for any bit pattern;
    // length and alignment were checked above.
    let blocks = unsafe { std::slice::from_raw_parts(src.as_ptr() as *const B, src.len() / size) };
    B::to_float(blocks, dst);
    Ok(())
}

/// The block types whose rows are dequantized by our own loops: candle's `to_float` runs scalar in
/// a build for baseline x86-64 (it was 13% of a Q8_0 prefill), the loops below are vectorised by
/// the compiler where AVX2 is there. Same arithmetic as candle's, so the same values.
#[derive(Clone, Copy, Debug)]
enum FastBlocks {
    /// An f16 scale and 32 int8 values: 34 bytes.
    Q8_0,
    /// f16 scale and minimum, 16 bytes of 4-bit values (value `j < 16` the low nibble of byte
    /// `j`, value `j + 16` its high nibble): 20 bytes.
    Q4_1,
}

impl FastBlocks {
    fn bytes(self) -> usize {
        match self {
            Self::Q8_0 => 34,
            Self::Q4_1 => 20,
        }
    }
}

#[inline(always)]
fn fast_blocks_loop(kind: FastBlocks, src: &[u8], dst: &mut [f32]) {
    let half_at = |b: &[u8], i: usize| half::f16::from_le_bytes([b[i], b[i + 1]]).to_f32();
    match kind {
        FastBlocks::Q8_0 => {
            for (b, o) in src.chunks_exact(34).zip(dst.chunks_exact_mut(32)) {
                let d = half_at(b, 0);
                for (o, &q) in o.iter_mut().zip(&b[2..34]) {
                    *o = f32::from(q as i8) * d;
                }
            }
        }
        FastBlocks::Q4_1 => {
            for (b, o) in src.chunks_exact(20).zip(dst.chunks_exact_mut(32)) {
                let (d, m) = (half_at(b, 0), half_at(b, 2));
                let (lo, hi) = o.split_at_mut(16);
                for ((l, h), &q) in lo.iter_mut().zip(hi.iter_mut()).zip(&b[4..20]) {
                    *l = f32::from(q & 0x0f) * d + m;
                    *h = f32::from(q >> 4) * d + m;
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn fast_blocks_loop_avx2(kind: FastBlocks, src: &[u8], dst: &mut [f32]) {
    fast_blocks_loop(kind, src, dst)
}

/// Whole blocks `src` of type `kind` to f32 values in `dst` (32 per block).
fn fast_blocks_to_f32(kind: FastBlocks, src: &[u8], dst: &mut [f32]) -> Result<()> {
    let size = kind.bytes();
    if !src.len().is_multiple_of(size) || dst.len() != src.len() / size * 32 {
        return Err(err(format!(
            "quantized_linear: {kind:?} row of the wrong length"
        )));
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 is available (checked just above).
        unsafe { fast_blocks_loop_avx2(kind, src, dst) };
        return Ok(());
    }
    fast_blocks_loop(kind, src, dst);
    Ok(())
}

impl QuantizedWeight {
    /// Take a 2-D `QTensor` `[out, in]` (as read from a GGUF file).
    pub fn from_qtensor(qt: &QTensor) -> Result<Self> {
        let (rows, cols) = qt.shape().dims2()?;
        let dtype = qt.dtype();
        if !supported(dtype) {
            return Err(err(format!(
                "quantized_linear: {dtype:?} weights are not supported (supported: F32, F16, \
                 Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K)"
            )));
        }
        if !cols.is_multiple_of(dtype.block_size()) {
            return Err(err(format!(
                "quantized_linear: rows of {cols} values are not whole {dtype:?} blocks of {}",
                dtype.block_size()
            )));
        }
        let bytes = qt.data()?.into_owned();
        let w = Self {
            id: fresh_id(),
            storage: Storage::Blocks(Arc::new(bytes)),
            dtype,
            rows,
            cols,
        };
        if w.size_in_bytes() != rows * w.row_bytes() {
            return Err(err(format!(
                "quantized_linear: {} bytes for a {dtype:?} [{rows}, {cols}] weight, expected {}",
                w.size_in_bytes(),
                rows * w.row_bytes()
            )));
        }
        Ok(w)
    }

    /// A dense `[out, in]` weight as f32 panels (exactly its values, widened to f32): the
    /// inference layout: panels of 16 rows, `[cols][16]` each, the last one padded with zeros.
    pub fn panels(w: &Tensor) -> Result<Self> {
        let (rows, cols) = match w.dims() {
            &[r, c] if r > 0 && c > 0 => (r, c),
            d => {
                return Err(err(format!(
                    "quantized_linear: only a non-empty matrix can be kept as panels, not {d:?}"
                )))
            }
        };
        if !w.device().is_cpu() {
            return Err(err("quantized_linear: panels are for weights on the CPU"));
        }
        // No copy of an f32 weight's values on the way: packing a whole base holds one matrix
        // twice at most.
        let w = w.to_dtype(DType::F32)?.contiguous()?;
        let (storage, layout) = w.storage_and_layout();
        let candle_core::Storage::Cpu(CpuStorage::F32(v)) = &*storage else {
            return Err(err("quantized_linear: expected f32 storage"));
        };
        let Some((a, b)) = layout.contiguous_offsets() else {
            return Err(err("quantized_linear: expected a contiguous weight"));
        };
        let values = &v[a..b];
        Self::panels_from(rows, cols, |r0, n, dst| {
            dst.copy_from_slice(&values[r0 * cols..(r0 + n) * cols]);
            Ok(())
        })
    }

    /// The same weight as f32 panels (blocks dequantized 16 rows at a time, never all at once).
    pub fn to_panels(&self) -> Result<Self> {
        if self.is_panels() {
            return Ok(self.clone());
        }
        Self::panels_from(self.rows, self.cols, |r0, n, dst| {
            self.dequantize_rows_serial(r0, n, dst)
        })
    }

    /// Panels of `rows x cols` values, `fill(r0, n, dst)` writing rows `r0..r0 + n` (row-major)
    /// into `dst`; one panel per task.
    fn panels_from(
        rows: usize,
        cols: usize,
        fill: impl Fn(usize, usize, &mut [f32]) -> Result<()> + Sync,
    ) -> Result<Self> {
        use super::panel_gemm::{rows_to_panels, PANEL};
        let mut panels = vec![0f32; rows.next_multiple_of(PANEL) * cols];
        panels
            .par_chunks_mut(PANEL * cols)
            .enumerate()
            .try_for_each_init(
                || vec![0f32; PANEL * cols],
                |buf, (i, panel)| {
                    let (r0, n) = (i * PANEL, PANEL.min(rows - i * PANEL));
                    fill(r0, n, &mut buf[..n * cols])?;
                    rows_to_panels(&buf[..n * cols], cols, panel);
                    Ok::<_, candle_core::Error>(())
                },
            )?;
        Ok(Self {
            id: fresh_id(),
            storage: Storage::Panels(Arc::new(panels)),
            dtype: GgmlDType::F32,
            rows,
            cols,
        })
    }

    /// Whether the values are f32 panels rather than GGUF blocks.
    pub fn is_panels(&self) -> bool {
        matches!(self.storage, Storage::Panels(_))
    }

    /// The panels' values, `ceil(rows / 16)` panels of `[cols][16]`, if that is the storage.
    pub(crate) fn panel_values(&self) -> Option<&[f32]> {
        match &self.storage {
            Storage::Panels(v) => Some(v),
            Storage::Blocks(_) => None,
        }
    }

    /// See the field.
    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    /// How the values are held, for messages: `quantized (Q4_1 blocks)`, `packed (f32 panels)`.
    pub fn kind(&self) -> String {
        match self.storage {
            Storage::Blocks(_) => format!("quantized ({:?} blocks)", self.dtype),
            Storage::Panels(_) => "packed (f32 panels)".to_string(),
        }
    }

    /// Quantize a dense `[out, in]` weight (a user converting an f32 base, and tests).
    pub fn quantize(w: &Tensor, dtype: GgmlDType) -> Result<Self> {
        Self::from_qtensor(&QTensor::quantize(&w.to_dtype(DType::F32)?, dtype)?)
    }

    /// The same weight with its rows reordered: row `i` of the result is row `perm[i]` here
    /// (GGUF stores Llama's Q/K rows permuted for its RoPE layout; whole rows move as blocks).
    pub fn permute_rows(&self, perm: &[usize]) -> Result<Self> {
        if perm.len() != self.rows || perm.iter().any(|&p| p >= self.rows) {
            return Err(err("quantized_linear: bad row permutation"));
        }
        let Storage::Blocks(bytes) = &self.storage else {
            return Err(err(
                "quantized_linear: rows of f32 panels are permuted before packing, not after",
            ));
        };
        let rb = self.row_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        for &p in perm {
            out.extend_from_slice(&bytes[p * rb..(p + 1) * rb]);
        }
        Ok(Self {
            id: fresh_id(),
            storage: Storage::Blocks(Arc::new(out)),
            ..self.clone()
        })
    }

    pub fn dtype(&self) -> GgmlDType {
        self.dtype
    }

    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// Bytes held: the blocks or panels only.
    pub fn size_in_bytes(&self) -> usize {
        match &self.storage {
            Storage::Blocks(b) => b.len(),
            Storage::Panels(v) => v.len() * 4,
        }
    }

    fn row_bytes(&self) -> usize {
        self.cols / self.dtype.block_size() * self.dtype.type_size()
    }

    /// Rows `[r0, r0 + n)` as f32, row-major, into `dst` (`n * cols` values).
    fn dequantize_rows(&self, r0: usize, n: usize, dst: &mut [f32]) -> Result<()> {
        // Rows are independent: dequantize them in parallel.
        dst[..n * self.cols]
            .par_chunks_mut(self.cols)
            .enumerate()
            .try_for_each(|(i, d)| self.row_into(r0 + i, d))
    }

    /// [`Self::dequantize_rows`] on the calling thread.
    pub(crate) fn dequantize_rows_serial(
        &self,
        r0: usize,
        n: usize,
        dst: &mut [f32],
    ) -> Result<()> {
        dst[..n * self.cols]
            .chunks_mut(self.cols)
            .enumerate()
            .try_for_each(|(i, d)| self.row_into(r0 + i, d))
    }

    /// Row `i` as f32 into `d` (`cols` values).
    pub(crate) fn row_into(&self, i: usize, d: &mut [f32]) -> Result<()> {
        match &self.storage {
            Storage::Blocks(bytes) => {
                let rb = self.row_bytes();
                self.row_to_f32(&bytes[i * rb..(i + 1) * rb], d)
            }
            Storage::Panels(v) => {
                use super::panel_gemm::PANEL;
                let panel = &v[i / PANEL * PANEL * self.cols..][..PANEL * self.cols];
                for (o, line) in d.iter_mut().zip(panel.chunks_exact(PANEL)) {
                    *o = line[i % PANEL];
                }
                Ok(())
            }
        }
    }

    fn row_to_f32(&self, s: &[u8], d: &mut [f32]) -> Result<()> {
        use GgmlDType as G;
        match self.dtype {
            G::F32 => {
                for (o, c) in d.iter_mut().zip(s.chunks_exact(4)) {
                    *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
                Ok(())
            }
            G::F16 => {
                for (o, c) in d.iter_mut().zip(s.chunks_exact(2)) {
                    *o = half::f16::from_le_bytes([c[0], c[1]]).to_f32();
                }
                Ok(())
            }
            G::Q4_0 => blocks_to_f32::<BlockQ4_0>(s, d),
            G::Q4_1 => fast_blocks_to_f32(FastBlocks::Q4_1, s, d),
            G::Q5_0 => blocks_to_f32::<BlockQ5_0>(s, d),
            G::Q5_1 => blocks_to_f32::<BlockQ5_1>(s, d),
            G::Q8_0 => fast_blocks_to_f32(FastBlocks::Q8_0, s, d),
            G::Q2K => blocks_to_f32::<BlockQ2K>(s, d),
            G::Q3K => blocks_to_f32::<BlockQ3K>(s, d),
            G::Q4K => blocks_to_f32::<BlockQ4K>(s, d),
            G::Q5K => blocks_to_f32::<BlockQ5K>(s, d),
            G::Q6K => blocks_to_f32::<BlockQ6K>(s, d),
            other => Err(err(format!("quantized_linear: {other:?} is not supported"))),
        }
    }

    /// The rows `ids` (u32, any shape, flattened) as an f32 tensor `[ids, cols]`: an embedding
    /// lookup that dequantizes only the rows it reads.
    pub fn rows(&self, ids: &Tensor) -> Result<Tensor> {
        let ids: Vec<u32> = ids.flatten_all()?.to_dtype(DType::U32)?.to_vec1()?;
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= self.rows) {
            candle_core::bail!("token id {bad} is outside the {} embedding rows", self.rows);
        }
        let mut out = vec![0f32; ids.len() * self.cols];
        out.par_chunks_mut(self.cols)
            .zip(ids.par_iter())
            .try_for_each(|(d, &i)| self.row_into(i as usize, d))?;
        Tensor::from_vec(out, (ids.len(), self.cols), &candle_core::Device::Cpu)
    }

    /// The whole weight as a dense f32 tensor (reference checks, merging).
    pub fn dequantize(&self) -> Result<Tensor> {
        let mut out = vec![0f32; self.rows * self.cols];
        self.dequantize_rows(0, self.rows, &mut out)?;
        Tensor::from_vec(out, (self.rows, self.cols), &candle_core::Device::Cpu)
    }
}

/// Rows of the weight dequantized per tile: small enough to stay in cache, big enough for gemm.
const TILE_ROWS: usize = 128;

struct QuantizedMatmul {
    w: QuantizedWeight,
    /// false: `y = x W^T` (`x: [m, in]`); true: `y = x W` (`x: [m, out]`), the input gradient.
    transposed: bool,
}

impl QuantizedMatmul {
    /// The tiles are the parallel tasks: each dequantizes its own tile and multiplies it on its
    /// own thread. One fork-join per product instead of two per tile (one to dequantize, one for
    /// gemm), which dominated short prompts: a 32-token prompt through SmolLM2 is ~1700 tiles.
    fn product(&self, x: &[f32], m: usize) -> Result<Vec<f32>> {
        match self.transposed {
            false => self.product_by_columns(x, m),
            true => self.product_t_by_partial_sums(x, m),
        }
    }

    /// Rows per tile: enough tiles to balance the threads, each still big enough for gemm.
    fn tile_rows(&self) -> usize {
        self.w
            .rows
            .div_ceil(rayon::current_num_threads().max(1) * 4)
            .next_multiple_of(16)
            .clamp(16, TILE_ROWS)
    }
}

/// A pointer the tasks of one parallel loop write through, each to its own elements.
struct SharedOut(*mut f32);

// SAFETY: the tasks write disjoint elements, and the buffer outlives the loop.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    fn get(&self) -> *mut f32 {
        self.0
    }
}

impl QuantizedMatmul {
    /// Tile `i` of the weight dequantized into `tile`: its first row, its row count and its
    /// `[rows, in]` values.
    fn dequantized_tile<'t>(
        &self,
        i: usize,
        tile: &'t mut [f32],
    ) -> Result<(usize, usize, &'t [f32])> {
        let tile_rows = self.tile_rows();
        let r0 = i * tile_rows;
        let r = tile_rows.min(self.w.rows - r0);
        let t = &mut tile[..r * self.w.cols];
        self.w.dequantize_rows_serial(r0, r, t)?;
        Ok((r0, r, t))
    }

    /// `x W^T`: each tile's task writes its own block of output columns.
    fn product_by_columns(&self, x: &[f32], m: usize) -> Result<Vec<f32>> {
        #[cfg(target_arch = "x86_64")]
        if super::panel_gemm::available() {
            return self.product_by_panels(x, m);
        }
        let (n_rows, k) = (self.w.rows, self.w.cols);
        let mut y = vec![0f32; m * n_rows];
        let tile_rows = self.tile_rows();
        let out = SharedOut(y.as_mut_ptr());
        (0..n_rows.div_ceil(tile_rows))
            .into_par_iter()
            .try_for_each_init(
                || vec![0f32; tile_rows * k],
                |tile, i| -> Result<()> {
                    let (r0, r, t) = self.dequantized_tile(i, tile)?;
                    // SAFETY: this task writes only the columns r0..r0+r of `y` ([m, n_rows]);
                    // `x` is [m, k] and `t` [r, k], as the strides say.
                    unsafe {
                        gemm::gemm(
                            m,
                            r,
                            k,
                            out.get().add(r0),
                            1,
                            n_rows as isize,
                            false,
                            x.as_ptr(),
                            1,
                            k as isize,
                            t.as_ptr(),
                            k as isize,
                            1,
                            0.0,
                            1.0,
                            false,
                            false,
                            false,
                            gemm::Parallelism::None,
                        );
                    }
                    Ok(())
                },
            )?;
        Ok(y)
    }

    /// [`Self::product_by_columns`] with each tile's rows put in panels for the AVX2 kernel of
    /// [`super::panel_gemm`] instead of handed to gemm, which would pack them into panels again.
    #[cfg(target_arch = "x86_64")]
    fn product_by_panels(&self, x: &[f32], m: usize) -> Result<Vec<f32>> {
        use super::panel_gemm::{product, rows_to_panels};
        if let Storage::Panels(panels) = &self.w.storage {
            return Ok(self.product_in_place(panels, x, m));
        }
        let (n_rows, k) = (self.w.rows, self.w.cols);
        let mut y = vec![0f32; m * n_rows];
        let tile_rows = self.tile_rows();
        let out = SharedOut(y.as_mut_ptr());
        (0..n_rows.div_ceil(tile_rows))
            .into_par_iter()
            .try_for_each_init(
                || (vec![0f32; tile_rows * k], vec![0f32; tile_rows * k]),
                |(tile, panels), i| -> Result<()> {
                    let (r0, r, t) = self.dequantized_tile(i, tile)?;
                    rows_to_panels(t, k, panels);
                    // SAFETY: AVX2/FMA checked by the caller; this task writes only the columns
                    // r0..r0+r of `y` ([m, n_rows]).
                    unsafe { product(x, (m, k, k), panels, r, out.get().add(r0), n_rows, false) };
                    Ok(())
                },
            )?;
        Ok(y)
    }

    /// [`Self::product_by_panels`] on a weight already in panels: each tile's task reads its
    /// panels where they are.
    #[cfg(target_arch = "x86_64")]
    fn product_in_place(&self, panels: &[f32], x: &[f32], m: usize) -> Vec<f32> {
        let (n_rows, k) = (self.w.rows, self.w.cols);
        let tile_rows = self.tile_rows();
        let mut y = Vec::with_capacity(m * n_rows);
        let out = SharedOut(y.as_mut_ptr());
        (0..n_rows.div_ceil(tile_rows))
            .into_par_iter()
            .for_each(|i| {
                let r0 = i * tile_rows;
                let r = tile_rows.min(n_rows - r0);
                // Tiles start on whole panels (`tile_rows` is a multiple of 16).
                let end = (r0 + r).next_multiple_of(super::panel_gemm::PANEL) * k;
                let tile = &panels[r0 * k..end];
                // The next tile: most often this thread's next task (rayon splits the range
                // into runs).
                let ahead = &panels[end..(end + tile_rows * k).min(panels.len())];
                // SAFETY: AVX2/FMA checked by the caller; this task writes only (all of) the
                // columns r0..r0+r of `y` ([m, n_rows]), within its capacity.
                unsafe {
                    super::panel_gemm::product_prefetching(
                        x,
                        (m, k, k),
                        tile,
                        r,
                        out.get().add(r0),
                        n_rows,
                        false,
                        ahead,
                    )
                };
            });
        // SAFETY: the tiles cover every column of every row, each written above.
        unsafe { y.set_len(m * n_rows) };
        y
    }

    /// `x W` (`x: [m, out]`, the input-gradient direction): every tile adds into all of `y`, so
    /// each thread sums its tiles into its own `[m, in]` buffer and the buffers are added at the
    /// end.
    fn product_t_by_partial_sums(&self, x: &[f32], m: usize) -> Result<Vec<f32>> {
        let (n_rows, k) = (self.w.rows, self.w.cols);
        let tile_rows = self.tile_rows();
        let tiles = n_rows.div_ceil(tile_rows);
        let threads = rayon::current_num_threads().max(1);
        let partials = (0..tiles)
            .into_par_iter()
            // About one run of tiles (and one partial sum) per thread.
            .with_min_len(tiles.div_ceil(threads))
            .try_fold(
                || (vec![0f32; tile_rows * k], vec![0f32; m * k], false),
                |(mut tile, mut acc, started), i| -> Result<_> {
                    let (r0, r, t) = self.dequantized_tile(i, &mut tile)?;
                    // SAFETY: acc[m, k] += x[:, r0..r0+r] · t[r, k]; `x` is [m, n_rows].
                    unsafe {
                        gemm::gemm(
                            m,
                            k,
                            r,
                            acc.as_mut_ptr(),
                            1,
                            k as isize,
                            started,
                            x.as_ptr().add(r0),
                            1,
                            n_rows as isize,
                            t.as_ptr(),
                            1,
                            k as isize,
                            1.0,
                            1.0,
                            false,
                            false,
                            false,
                            gemm::Parallelism::None,
                        );
                    }
                    Ok((tile, acc, true))
                },
            )
            .map(|r| r.map(|(_, acc, started)| started.then_some(acc)))
            .collect::<Result<Vec<_>>>()?;
        let mut parts = partials.into_iter().flatten();
        let mut y = parts.next().unwrap_or_else(|| vec![0f32; m * k]);
        for p in parts {
            y.iter_mut().zip(&p).for_each(|(a, b)| *a += b);
        }
        Ok(y)
    }
}

impl CustomOp1 for QuantizedMatmul {
    fn name(&self) -> &'static str {
        "metapeft-quantized-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = l.dims();
        let in_cols = if self.transposed {
            self.w.rows
        } else {
            self.w.cols
        };
        let last = *dims.last().unwrap_or(&0);
        if last != in_cols {
            candle_core::bail!(
                "quantized_linear: input has {last} features but the weight is {:?} [{}, {}]{}",
                self.w.dtype,
                self.w.rows,
                self.w.cols,
                if self.transposed { " (transposed)" } else { "" }
            );
        }
        let x = match s {
            CpuStorage::F32(v) => match l.contiguous_offsets() {
                Some((a, b)) => &v[a..b],
                None => candle_core::bail!("quantized_linear: input must be contiguous"),
            },
            _ => candle_core::bail!("quantized_linear: f32 activations only"),
        };
        let m = x.len() / in_cols.max(1);
        let y = self.product(x, m)?;
        let mut out = dims.to_vec();
        if let Some(o) = out.last_mut() {
            *o = if self.transposed {
                self.w.cols
            } else {
                self.w.rows
            };
        }
        Ok((CpuStorage::F32(y), Shape::from(out)))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let flipped = QuantizedMatmul {
            w: self.w.clone(),
            transposed: !self.transposed,
        };
        Ok(Some(g.contiguous()?.apply_op1(flipped)?))
    }
}

/// Inputs with fewer rows than this take the integer kernels of [`crate::quant`] inside
/// [`with_integer_kernels`] (decoding); longer prompts go through gemm on dequantized tiles.
const INTEGER_KERNEL_ROWS: usize = 24;

thread_local! {
    static INTEGER_KERNELS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Run `f` with the integer kernels allowed for Q8_0/Q4_1 weights on this thread: generation
/// opts in, since its activations are quantized to 8 bits there (llama.cpp's scheme, slightly
/// different from the dequantized product). Training and evaluation keep the exact product.
pub fn with_integer_kernels<T>(f: impl FnOnce() -> T) -> T {
    // Restored on drop, so a panic inside `f` (caught further up) does not leave the thread
    // taking the integer kernels outside generation.
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            INTEGER_KERNELS.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(INTEGER_KERNELS.with(|c| c.replace(true)));
    f()
}

/// `x W^T` for a frozen quantized `W: [out, in]` and f32 `x: [..., in]` on the CPU; the input
/// gets a gradient, the weight none.
///
/// Inside [`with_integer_kernels`], an input with a few rows and no graph meets Q8_0/Q4_1
/// weights with integer dot products on an 8-bit quantized copy of `x` (faster, not bit-equal to
/// the dequantized product). Everything else gets the exact tiled product.
pub fn quantized_linear(x: &Tensor, w: &QuantizedWeight) -> Result<Tensor> {
    if !x.device().is_cpu() || x.dtype() != DType::F32 {
        // Elsewhere, the dense weight: correct, without the memory saving.
        return super::frozen_linear(
            x,
            &w.dequantize()?.to_device(x.device())?.to_dtype(x.dtype())?,
        );
    }
    match integer_kernel(x, w) {
        Some(q) => q.linear(x).map_err(|e| err(e.to_string())),
        None => quantized_linear_exact(x, w),
    }
}

/// The integer-kernel view of `w` when `x` may take it (see [`quantized_linear`]).
fn integer_kernel(x: &Tensor, w: &QuantizedWeight) -> Option<crate::quant::QWeight> {
    let rows = x.elem_count() / w.cols.max(1);
    if rows >= INTEGER_KERNEL_ROWS
        || x.track_op()
        || !x.device().is_cpu()
        || x.dtype() != DType::F32
        || !INTEGER_KERNELS.with(|c| c.get())
    {
        return None;
    }
    w.integer_view()
}

impl QuantizedWeight {
    /// The same blocks as a [`crate::quant::QWeight`] (no copy), for the block types with
    /// integer kernels (Q8_0, Q4_1).
    pub(crate) fn integer_view(&self) -> Option<crate::quant::QWeight> {
        let kind = match self.dtype {
            GgmlDType::Q8_0 => crate::quant::QKind::Q8_0,
            GgmlDType::Q4_1 => crate::quant::QKind::Q4_1,
            _ => return None,
        };
        let Storage::Blocks(bytes) = &self.storage else {
            return None;
        };
        Some(crate::quant::QWeight::from_shared(
            kind,
            self.rows,
            self.cols,
            bytes.clone(),
        ))
    }
}

/// Logits within this much of a row's maximum are recomputed exactly by [`quantized_logits`].
/// The 8-bit activations move SmolLM2's logits by at most 0.26 (measured on its Q8_0 head).
const RESCORE_MARGIN: f32 = 1.0;

/// Logits `x W^T` by a quantized LM head. Where [`quantized_linear`] would take the integer
/// kernels (decoding), it does, and then recomputes exactly every logit within `RESCORE_MARGIN`
/// of its row's maximum: the candidates for the greedy pick (and nearly all of a sampler's mass)
/// get the dequantized model's values, so a near-tie is not flipped by activation rounding
/// (SmolLM2's first answer token to a chat prompt is one: 0.08 apart). Elsewhere, the exact
/// product.
pub fn quantized_logits(x: &Tensor, w: &QuantizedWeight) -> Result<Tensor> {
    let Some(q) = integer_kernel(x, w) else {
        return quantized_linear_exact(x, w);
    };
    let y = q.linear(x).map_err(|e| err(e.to_string()))?;
    let dims = y.dims().to_vec();
    let mut yv = y.flatten_all()?.to_vec1::<f32>()?;
    let xv = x.flatten_all()?.to_vec1::<f32>()?;
    for (yr, xr) in yv.chunks_mut(w.rows).zip(xv.chunks(w.cols)) {
        rescore_near_top(yr, xr, |j, row| w.row_into(j, row))?;
    }
    Tensor::from_vec(yv, dims, x.device())
}

/// Recompute exactly (`x . W[j]`, with `row` writing `W[j]` in f32) every logit of one row within
/// `RESCORE_MARGIN` of its maximum. Shared by the tensor path and the fused decoder.
pub(crate) fn rescore_near_top(
    logits: &mut [f32],
    x: &[f32],
    mut row: impl FnMut(usize, &mut [f32]) -> Result<()>,
) -> Result<()> {
    let top = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut w = vec![0f32; x.len()];
    for (j, v) in logits.iter_mut().enumerate() {
        if *v >= top - RESCORE_MARGIN {
            row(j, &mut w)?;
            *v = w.iter().zip(x).map(|(a, b)| a * b).sum();
        }
    }
    Ok(())
}

/// `x W` for `x: [..., out]`: the input-gradient direction of [`quantized_linear`], itself
/// differentiable.
pub(crate) fn quantized_linear_t(x: &Tensor, w: &QuantizedWeight) -> Result<Tensor> {
    x.contiguous()?.apply_op1(QuantizedMatmul {
        w: w.clone(),
        transposed: true,
    })
}

/// The exact tiled product on raw rows, for fused ops: `x W^T` (`x: [m, in]`) or, `transposed`,
/// `x W` (`x: [m, out]`).
pub(crate) fn quantized_product(
    w: &QuantizedWeight,
    x: &[f32],
    m: usize,
    transposed: bool,
) -> Result<Vec<f32>> {
    QuantizedMatmul {
        w: w.clone(),
        transposed,
    }
    .product(x, m)
}

/// [`quantized_linear`] always on the exact tiled product.
pub fn quantized_linear_exact(x: &Tensor, w: &QuantizedWeight) -> Result<Tensor> {
    if !x.device().is_cpu() || x.dtype() != DType::F32 {
        return quantized_linear(x, w);
    }
    x.contiguous()?.apply_op1(QuantizedMatmul {
        w: w.clone(),
        transposed: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::k_quants::{BlockQ4_1, BlockQ8_0};
    use candle_core::{Device, Var};

    /// Our Q8_0 and Q4_1 dequantization gives candle's values bit for bit, on random blocks
    /// (finite scales and minima, every byte value), and rejects rows of a wrong length.
    #[test]
    fn q8_0_and_q4_1_rows_equal_candles_dequantization() -> Result<()> {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut byte = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        };
        for (kind, halves) in [(FastBlocks::Q8_0, 1), (FastBlocks::Q4_1, 2)] {
            let block = kind.bytes();
            let ours = |s: &[u8], d: &mut [f32]| fast_blocks_to_f32(kind, s, d);
            let blocks = 37;
            let mut src = Vec::with_capacity(blocks * block);
            for _ in 0..blocks {
                for _ in 0..halves {
                    let v = half::f16::from_f32((f32::from(byte()) - 128.0) / 700.0);
                    src.extend_from_slice(&v.to_le_bytes());
                }
                for _ in 0..block - 2 * halves {
                    src.push(byte());
                }
            }
            let mut got = vec![0f32; blocks * 32];
            ours(&src, &mut got)?;
            // candle's blocks are 2-byte aligned: copy into an aligned buffer first.
            let mut aligned = vec![0u16; src.len() / 2];
            for (a, c) in aligned.iter_mut().zip(src.chunks_exact(2)) {
                *a = u16::from_ne_bytes([c[0], c[1]]);
            }
            let bytes =
                unsafe { std::slice::from_raw_parts(aligned.as_ptr() as *const u8, src.len()) };
            let mut want = vec![0f32; blocks * 32];
            match block {
                34 => blocks_to_f32::<BlockQ8_0>(bytes, &mut want)?,
                _ => blocks_to_f32::<BlockQ4_1>(bytes, &mut want)?,
            }
            let same = got
                .iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "block of {block} bytes differs from candle's");
            assert!(ours(&src[..src.len() - 1], &mut got[..blocks * 32]).is_err());
            assert!(ours(&src, &mut got[..blocks * 32 - 1]).is_err());
        }
        Ok(())
    }

    fn max_rel(a: &Tensor, b: &Tensor) -> Result<f32> {
        let scale = b.abs()?.max_all()?.to_scalar::<f32>()?.max(1e-6);
        Ok((a - b)?.abs()?.max_all()?.to_scalar::<f32>()? / scale)
    }

    /// `quantized_linear(x, q)` and its input gradient (of the summed squares) within 1e-5 of
    /// the frozen linear map by `dense`; the output.
    fn assert_like_dense(
        x: &Tensor,
        q: &QuantizedWeight,
        dense: &Tensor,
        what: &str,
    ) -> Result<Tensor> {
        let x = Var::from_tensor(x)?;
        let y = quantized_linear(x.as_tensor(), q)?;
        let want = super::super::frozen_linear(x.as_tensor(), dense)?;
        let e = max_rel(&y, &want)?;
        assert!(e < 1e-5, "{what}: forward off by {e}");
        let g = y.sqr()?.sum_all()?.backward()?;
        let gw = want.sqr()?.sum_all()?.backward()?;
        let e = max_rel(
            g.get(x.as_tensor()).unwrap(),
            gw.get(x.as_tensor()).unwrap(),
        )?;
        assert!(e < 1e-5, "{what}: input gradient off by {e}");
        Ok(y)
    }

    #[test]
    fn matches_the_dequantized_weight_forward_and_backward() -> Result<()> {
        let dev = Device::Cpu;
        for (dtype, out, inp) in [
            (GgmlDType::Q8_0, 200, 96),
            (GgmlDType::Q4_1, 130, 64),
            (GgmlDType::Q4_0, 64, 32),
            (GgmlDType::Q4K, 40, 256),
            (GgmlDType::Q6K, 300, 256),
            (GgmlDType::F16, 70, 48),
        ] {
            let w = (Tensor::randn(0f32, 1.0, (out, inp), &dev)? * 0.1)?;
            let q = QuantizedWeight::quantize(&w, dtype)?;
            let dense = q.dequantize()?;
            // Quantization error is there (the point of the reference is the dequantized weight).
            assert!(max_rel(&dense, &w)? > 0.0 || dtype == GgmlDType::F16);
            let x = Tensor::randn(0f32, 1.0, (2, 3, inp), &dev)?;
            let y = assert_like_dense(&x, &q, &dense, &format!("{dtype:?}"))?;
            assert_eq!(y.dims(), &[2, 3, out]);
        }
        Ok(())
    }

    /// f32 panels hold exactly the weight's values (partial last panels included) in every
    /// direction: the product and its input gradient, embedding rows, and the dense weight back;
    /// blocks turned into panels hold their dequantized values.
    #[test]
    fn panels_hold_the_f32_weight_exactly() -> Result<()> {
        let dev = Device::Cpu;
        for (out, inp, m) in [(37, 20, 1), (130, 576, 9), (16, 1536, 128), (300, 64, 5)] {
            let w = Tensor::randn(0f32, 1.0, (out, inp), &dev)?;
            let q = QuantizedWeight::panels(&w)?;
            assert!(q.is_panels() && q.dims() == (out, inp));
            assert_eq!(q.size_in_bytes(), out.next_multiple_of(16) * inp * 4);
            assert_eq!(q.dequantize()?.to_vec2::<f32>()?, w.to_vec2::<f32>()?);
            let x = Tensor::randn(0f32, 1.0, (m, inp), &dev)?;
            assert_like_dense(&x, &q, &w, &format!("[{out}, {inp}]"))?;
            let ids = Tensor::new(&[0u32, out as u32 - 1, 17 % out as u32], &dev)?;
            assert_eq!(
                q.rows(&ids)?.to_vec2::<f32>()?,
                w.index_select(&ids, 0)?.to_vec2::<f32>()?
            );
        }
        let w = Tensor::randn(0f32, 1.0, (40, 64), &dev)?;
        let b = QuantizedWeight::quantize(&w, GgmlDType::Q4_1)?;
        let p = b.to_panels()?;
        assert!(p.is_panels() && !b.is_panels());
        assert_eq!(
            p.dequantize()?.to_vec2::<f32>()?,
            b.dequantize()?.to_vec2::<f32>()?
        );
        // Half precision is widened exactly.
        let h = w.to_dtype(DType::BF16)?;
        let p = QuantizedWeight::panels(&h)?;
        assert_eq!(
            p.dequantize()?.to_vec2::<f32>()?,
            h.to_dtype(DType::F32)?.to_vec2::<f32>()?
        );
        Ok(())
    }

    #[test]
    fn panels_refuse_what_they_cannot_hold() -> Result<()> {
        let dev = Device::Cpu;
        let e = QuantizedWeight::panels(&Tensor::zeros(8, DType::F32, &dev)?)
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(e.contains("non-empty matrix"), "{e}");
        assert!(QuantizedWeight::panels(&Tensor::zeros((0, 4), DType::F32, &dev)?).is_err());
        let p = QuantizedWeight::panels(&Tensor::zeros((3, 4), DType::F32, &dev)?)?;
        let e = p
            .permute_rows(&[2, 1, 0])
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(e.contains("before packing"), "{e}");
        let x = Tensor::zeros((2, 5), DType::F32, &dev)?;
        let e = quantized_linear(&x, &p).unwrap_err().to_string();
        assert!(e.contains("5 features"), "{e}");
        let mut store = crate::params::ParamStore::new();
        store.insert_quantized("w", p);
        let e = store.get("w").unwrap_err().to_string();
        assert!(e.contains("stored packed (f32 panels)"), "{e}");
        Ok(())
    }

    #[test]
    fn permuted_rows_move_whole_blocks() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (6, 64), &dev)?;
        let q = QuantizedWeight::quantize(&w, GgmlDType::Q8_0)?;
        let perm = [5, 0, 3, 1, 4, 2];
        let p = q.permute_rows(&perm)?.dequantize()?;
        let d = q.dequantize()?;
        for (i, &src) in perm.iter().enumerate() {
            let e = max_rel(&p.get(i)?, &d.get(src)?)?;
            assert!(e == 0.0, "row {i}");
        }
        assert!(q.permute_rows(&[0, 1]).is_err());
        Ok(())
    }

    #[test]
    fn bad_inputs_are_errors() -> Result<()> {
        let dev = Device::Cpu;
        let q =
            QuantizedWeight::quantize(&Tensor::randn(0f32, 1.0, (8, 64), &dev)?, GgmlDType::Q8_0)?;
        let x = Tensor::randn(0f32, 1.0, (2, 63), &dev)?;
        let e = quantized_linear(&x, &q).unwrap_err().to_string();
        assert!(e.contains("63 features"), "{e}");
        // Rows that are not whole blocks.
        let e =
            QuantizedWeight::quantize(&Tensor::randn(0f32, 1.0, (8, 48), &dev)?, GgmlDType::Q4K);
        assert!(e.is_err());
        let e =
            QuantizedWeight::quantize(&Tensor::randn(0f32, 1.0, (8, 64), &dev)?, GgmlDType::Q8_1)
                .map(|_| ())
                .unwrap_err()
                .to_string();
        assert!(e.contains("not supported"), "{e}");
        Ok(())
    }

    /// A panic inside `with_integer_kernels` does not leave the thread on the integer kernels.
    #[test]
    fn the_integer_kernel_switch_is_restored_after_a_panic() {
        let caught = std::panic::catch_unwind(|| {
            with_integer_kernels(|| {
                assert!(INTEGER_KERNELS.with(|c| c.get()));
                panic!("inside generation");
            })
        });
        assert!(caught.is_err());
        assert!(!INTEGER_KERNELS.with(|c| c.get()));
    }

    /// Decoding logits: the integer product everywhere, except near each row's top, where they
    /// are the exact product's (so the integer error cannot flip a near-tie).
    #[test]
    fn decoding_logits_are_exact_near_the_top() -> Result<()> {
        // Seeded, so a run that fails fails again (candle cannot seed its CPU generator).
        let uniform = |dims: &[usize], seed: u64, scale: f64| {
            crate::ops::gradcheck::randn_f64(dims, seed, scale)?.to_dtype(DType::F32)
        };
        let rows = 8;
        for (dtype, seed) in [(GgmlDType::Q8_0, 1), (GgmlDType::Q4_1, 3)] {
            let w = uniform(&[512, 256], seed, 1.7)?;
            let q = QuantizedWeight::quantize(&w, dtype)?;
            let x = uniform(&[rows, 256], seed + 1, 0.35)?;
            let exact = quantized_linear_exact(&x, &q)?.to_vec2::<f32>()?;
            let int = with_integer_kernels(|| quantized_linear(&x, &q))?.to_vec2::<f32>()?;
            let got = with_integer_kernels(|| quantized_logits(&x, &q))?.to_vec2::<f32>()?;
            let (mut near, mut int_off) = (0, 0f32);
            for r in 0..rows {
                let top = exact[r].iter().copied().fold(f32::NEG_INFINITY, f32::max);
                for j in 0..512 {
                    if exact[r][j] >= top - 0.5 {
                        near += 1;
                        int_off = int_off.max((int[r][j] - exact[r][j]).abs());
                        assert!(
                            (got[r][j] - exact[r][j]).abs() < 1e-4,
                            "{dtype:?} row {r} logit {j}: {} vs exact {}",
                            got[r][j],
                            exact[r][j]
                        );
                    } else {
                        assert!((got[r][j] - exact[r][j]).abs() < 0.5);
                    }
                }
            }
            assert!(near >= rows);
            // Without the rescoring these would differ: the check can fail.
            assert!(int_off > 1e-4, "{dtype:?}: integer product already exact");
            // Outside with_integer_kernels it is the exact product.
            let plain = quantized_logits(&x, &q)?.to_vec2::<f32>()?;
            assert_eq!(plain, exact);
        }
        Ok(())
    }
}
