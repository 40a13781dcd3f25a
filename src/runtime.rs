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
