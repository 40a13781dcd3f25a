//! Process-wide runtime settings that must be fixed before the first tensor operation.

/// candle 0.11 runs element-wise ops on its own spinning "barrier pool" next to rayon's pool used
/// by matmuls; on a 2-core machine the two pools' spinning workers steal each other's cores
/// (SmolLM2-135M forward, 1 x 128: median 0.50-0.58 s -> 0.34-0.39 s; see BENCHMARKS.md).
/// Running candle's element-wise ops inline leaves the cores to rayon (matmuls and our kernels).
///
/// candle also asks for the matmul thread count on *every* matmul, and without RAYON_NUM_THREADS
/// that means `num_cpus::get_physical`, which parses /proc/cpuinfo each time (`perf`: 9% of a
/// quantized decode step in the kernel formatting cpuinfo). Pinning RAYON_NUM_THREADS to the
/// cores rayon uses anyway makes that an environment lookup.
///
/// Call at the start of `main`, before any other thread exists; explicit CANDLE_NUM_THREADS and
/// RAYON_NUM_THREADS from the user win.
pub fn configure_threads() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
}

/// glibc returns every freed block above its (dynamic) mmap threshold to the kernel and trims the
/// heap top eagerly, so each training step faults its activations and gradients in again, page by
/// page, zeroed by the kernel (`perf`: ~15% of a LoRA step, more of a MiniLM step, in page-fault
/// handling). Keeping blocks up to 32 MiB (glibc's ceiling) on the heap and never trimming lets
/// the next step reuse them. An explicit `MALLOC_*` setting from the user wins;
/// `METAPEFT_MALLOC=default` leaves glibc alone (for A/B timing). Call at the start of `main`.
pub fn configure_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var("METAPEFT_MALLOC").as_deref() != Ok("default") {
        let user = |k: &str| std::env::var_os(k).is_some();
        // SAFETY: mallopt only changes allocator parameters; called before other threads exist.
        unsafe {
            if !user("MALLOC_MMAP_THRESHOLD_") {
                libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
            }
            if !user("MALLOC_TRIM_THRESHOLD_") {
                libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
            }
            if !user("MALLOC_TOP_PAD_") {
                libc::mallopt(libc::M_TOP_PAD, 256 << 20);
            }
        }
    }
}

/// Hands the allocator's free memory back to the kernel, in every arena.
///
/// [`configure_allocator`] keeps freed blocks for the next training step, which is right for
/// threads that live as long as the command. The second-order MAML passes run on fresh threads
/// each episode (`meta::second_order`): their arenas keep the episode's ~15 GB (SmolLM2, 4 x 128)
/// after it, where the next episode's new threads may not reuse it (measured: two exact-MAML
/// episodes peaked at 22.3 GB or were killed at 24 GB, against 14.9 GB for one). Called after
/// each such pass; the next one faults its pages in again (~1 s of a ~26 s episode).
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory to the kernel; it is thread-safe.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Run `f` (the whole command) on one of rayon's worker threads instead of the main thread.
///
/// Every parallel kernel (gemm, our ops) called from outside the pool is injected into it: the
/// caller sleeps on a latch, a worker is woken to run the job, and the caller is woken again at
/// its end, so each op pays two or three futex wake-ups (`perf`, SmolLM2 forward 1 x 128: ~10% of
/// the time in the kernel's wake-up path) and the caller's core idles meanwhile. Called from a
/// worker, an op's halves go onto that worker's own deque and the caller works on one of them.
/// `METAPEFT_MAIN_ON_POOL=0` keeps the main thread (for A/B timing).
pub fn run_on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if std::env::var("METAPEFT_MAIN_ON_POOL").as_deref() == Ok("0") {
        return f();
    }
    // The command's backward passes recurse over the graph: give the workers the stack the main
    // thread would have had, and more (address space only; pages are touched as needed).
    let built = rayon::ThreadPoolBuilder::new()
        .stack_size(64 << 20)
        .thread_name(|i| format!("metapeft-{i}"))
        .build_global();
    match built {
        Ok(()) => rayon::scope(|_| f()),
        // Someone built the pool first (with its own stack size): keep the main thread.
        Err(_) => f(),
    }
}
