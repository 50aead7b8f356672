//! The scoring core shared by `edge-agent` and `cloud-hub`: image preprocessing, the
//! EfficientNet-Lite backbone, PatchCore, model bundles, thresholds and routing, signing,
//! metrics and data sets. The cloud tier's models, their training and the judge live in
//! `insp-cloud`, which only the hub links.
//!
//! Both binaries score frames through the same code, so a frame escalated from the edge
//! gets the identical edge score when the hub recomputes it with the same bundle.

pub mod anomaly_map;
pub mod backbone;
pub mod bundle;
pub mod calibration;
pub mod clock;
pub mod coreset;
pub mod dataset;
pub mod depthwise;
pub mod error;
pub mod evaluation;
pub mod golden;
pub mod image;
pub mod inverted_lists;
pub mod layers;
pub mod memory_bank;
pub mod metrics;
pub mod overlay;
pub mod patchcore;
pub mod patches;
pub mod pointwise;
pub mod quantile;
pub mod rng;
pub mod routing;
pub mod score_shift;
pub mod signing;
pub mod stem_conv;
pub mod synthetic;
pub mod weights;

pub use error::{Error, Result};

/// Keeps freed large buffers in the heap for reuse (glibc on Linux).
///
/// Scoring allocates the same few-megabyte activations for every frame. By default glibc
/// returns such blocks to the kernel on free and page-faults them in again on the next
/// frame, which costs more than the arithmetic of some layers. Binaries call this once at
/// start; it changes nothing elsewhere.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; it is called before threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 512 << 20);
    }
}

/// Runs candle's element-wise CPU operations on the calling thread unless the user set
/// `CANDLE_NUM_THREADS`; matrix products keep their threads (`RAYON_NUM_THREADS`).
///
/// candle 0.11's element-wise pool waits for its workers by spinning. When the CPU is
/// shared (other processes, or more threads than cores), a descheduled worker makes the
/// waiting thread spin through its time slice: on this project's 2-core development
/// machine under load, a heavy-model training step took 3.3 s with the pool and 0.6 s
/// without it. Binaries call this once at start, before any tensor operation.
pub fn tune_candle_threads() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // Called at start-up, before any thread that reads the environment exists.
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}
