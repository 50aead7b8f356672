//! The scoring core shared by `edge-agent` and `cloud-hub`: image preprocessing, the
//! EfficientNet-Lite backbone, PatchCore, model bundles, metrics and data sets.
//!
//! Both binaries score frames through the same code, so a frame escalated from the edge
//! gets the identical edge score when the hub recomputes it with the same bundle.

pub mod anomaly_map;
pub mod backbone;
pub mod bundle;
pub mod coreset;
pub mod dataset;
pub mod depthwise;
pub mod error;
pub mod evaluation;
pub mod image;
pub mod inverted_lists;
pub mod memory_bank;
pub mod metrics;
pub mod overlay;
pub mod patchcore;
pub mod pointwise;
pub mod rng;
pub mod routing;
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
