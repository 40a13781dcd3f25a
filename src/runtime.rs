//! Process-wide runtime settings that must be fixed before the first tensor operation.

/// candle 0.11 runs element-wise ops on its own spinning "barrier pool" next to rayon's pool used
/// by matmuls; on a 2-core machine the two pools' spinning workers steal each other's cores
/// (SmolLM2-135M forward, 1 x 128: median 0.50-0.58 s -> 0.34-0.39 s; see BENCHMARKS.md).
/// Running candle's element-wise ops inline leaves the cores to rayon (matmuls and our kernels).
/// Call at the start of `main`, before any other thread exists; an explicit CANDLE_NUM_THREADS
/// from the user wins.
pub fn configure_threads() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}

/// glibc serves every block above its mmap threshold (128 KiB at first) with a fresh `mmap` and
/// unmaps it on free, so each activation or gradient tensor of a training step costs page faults
/// and kernel zeroing of new pages (about 15% of a MiniLM LoRA step in `perf`). Keeping blocks up
/// to 32 MiB (glibc's ceiling) in the heap, and not trimming it, lets the next step reuse them.
/// Measured in BENCHMARKS.md; `METAPEFT_MALLOC=default` turns it off for comparison.
pub fn configure_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var("METAPEFT_MALLOC").as_deref() != Ok("default") {
        // SAFETY: mallopt only changes allocator parameters; called before other threads exist.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        }
    }
}
