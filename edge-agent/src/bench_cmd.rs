//! `edge-agent bench`: where the time of one frame goes, and how much memory it takes.
//!
//! Every frame is timed from its encoded bytes (already in memory) to the blurred map at
//! input size and the image score: decode + resize + normalise (preprocess), backbone and
//! feature aggregation, nearest-neighbour search, map. Batch 1 is the edge's case; the
//! batched run shows throughput when frames queue up.

use anyhow::{Context, Result};
use clap::Args;
use insp_core::patchcore::Timings;
use serde_json::json;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Arguments of `bench`.
#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    model: crate::model_args::ModelArgs,
    /// Images to stream: an MVTec-AD-layout folder (its test split) or a folder of images.
    #[arg(long)]
    data: PathBuf,
    /// Frames to time at batch 1 (after warm-up).
    #[arg(long, default_value_t = 100)]
    frames: usize,
    /// Batch size of the batched run (0 skips it).
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Also write the figures as one JSON object here.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn load_frames(data: &std::path::Path) -> Result<Vec<(String, Vec<u8>)>> {
    let paths: Vec<PathBuf> = if data.join("test").is_dir() {
        insp_core::dataset::test_images(data)?
            .into_iter()
            .map(|t| t.path)
            .collect()
    } else {
        insp_core::dataset::list_images(data)?
    };
    let frames: Vec<(String, Vec<u8>)> = paths
        .iter()
        .filter_map(|p| std::fs::read(p).ok().map(|b| (p.display().to_string(), b)))
        .collect();
    anyhow::ensure!(!frames.is_empty(), "no images found in {}", data.display());
    Ok(frames)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn percentile(values: &mut [f64], q: f64) -> f64 {
    insp_core::quantile::nearest_rank(values, q)
}

/// Peak resident memory of this process, bytes (Linux; 0 elsewhere).
fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// Runs `bench`.
pub fn run(args: BenchArgs, device: &candle_core::Device) -> Result<()> {
    let model = args.model.load(device)?;
    let frames = load_frames(&args.data)?;
    let threads = rayon::current_num_threads();
    // Warm-up: first calls allocate and fault in memory.
    for (name, bytes) in frames.iter().cycle().take(3) {
        let image = insp_core::image::decode(bytes, name)?;
        model.score_image(&image, &mut Timings::default())?;
    }
    let (mut total, mut pre, mut bb, mut knn, mut map) = (vec![], vec![], vec![], vec![], vec![]);
    let started = Instant::now();
    for (name, bytes) in frames.iter().cycle().take(args.frames.max(1)) {
        let t0 = Instant::now();
        let image = insp_core::image::decode(bytes, name)?;
        let decode = t0.elapsed();
        let mut t = Timings::default();
        let scored = model.score_image(&image, &mut t)?;
        std::hint::black_box(scored.score);
        total.push(ms(t0.elapsed()));
        pre.push(ms(decode + t.preprocess));
        bb.push(ms(t.backbone));
        knn.push(ms(t.knn));
        map.push(ms(t.map));
    }
    let fps1 = total.len() as f64 / started.elapsed().as_secs_f64();
    let mut batched = None;
    if args.batch > 1 {
        let n_batches = (args.frames / args.batch).max(2);
        let mut per_frame = vec![];
        let started = Instant::now();
        let mut it = frames.iter().cycle();
        for _ in 0..n_batches {
            let t0 = Instant::now();
            let images = (0..args.batch)
                .map(|_| {
                    let (name, bytes) = it.next().context("no frames")?;
                    Ok(insp_core::image::decode(bytes, name)?)
                })
                .collect::<Result<Vec<_>>>()?;
            let refs: Vec<&image::DynamicImage> = images.iter().collect();
            model.score_images(&refs, &mut Timings::default())?;
            per_frame.push(ms(t0.elapsed()) / args.batch as f64);
        }
        let fps = (n_batches * args.batch) as f64 / started.elapsed().as_secs_f64();
        batched = Some((percentile(&mut per_frame, 0.5), fps));
    }
    let bank = model.bank();
    let p = model.preprocessing();
    let figures = json!({
        "bundle": model.manifest().version,
        "backbone": model.manifest().backbone.variant,
        "input": if p.keep_aspect { format!("about {}x{} pixels, aspect kept", p.width, p.height) } else { format!("{}x{}", p.width, p.height) },
        "search": match (args.model.exact_search, bank.inverted_lists()) {
            (false, Some(index)) => format!("ivf {} lists, {} probes", index.lists(), index.probes),
            _ => "exact".to_string(),
        },
        "device": format!("{device:?}"),
        "threads": threads,
        "frames": total.len(),
        "total_ms_p50": percentile(&mut total.clone(), 0.5),
        "total_ms_p99": percentile(&mut total.clone(), 0.99),
        "preprocess_ms_p50": percentile(&mut pre.clone(), 0.5),
        "preprocess_ms_p99": percentile(&mut pre, 0.99),
        "backbone_ms_p50": percentile(&mut bb.clone(), 0.5),
        "backbone_ms_p99": percentile(&mut bb, 0.99),
        "knn_ms_p50": percentile(&mut knn.clone(), 0.5),
        "knn_ms_p99": percentile(&mut knn, 0.99),
        "map_ms_p50": percentile(&mut map.clone(), 0.5),
        "map_ms_p99": percentile(&mut map, 0.99),
        "fps_batch1": fps1,
        "batch": args.batch,
        "batched_ms_per_frame_p50": batched.map(|b| b.0),
        "fps_batched": batched.map(|b| b.1),
        "bank_rows": bank.rows(),
        "bank_dims": bank.dims(),
        "bank_bytes": bank.bytes(),
        "peak_rss_bytes": peak_rss_bytes(),
    });
    let f = |k: &str| figures[k].as_f64().unwrap_or(f64::NAN);
    println!(
        "bundle {} ({}, input {}), {} threads, {} frames at batch 1",
        figures["bundle"],
        figures["backbone"],
        figures["input"],
        threads,
        total.len()
    );
    println!("  {:<11} {:>8} {:>8}", "ms/frame", "p50", "p99");
    for (label, key) in [
        ("total", "total"),
        ("preprocess", "preprocess"),
        ("backbone", "backbone"),
        ("knn", "knn"),
        ("map", "map"),
    ] {
        println!(
            "  {label:<11} {:>8.2} {:>8.2}",
            f(&format!("{key}_ms_p50")),
            f(&format!("{key}_ms_p99"))
        );
    }
    println!("  throughput  {:.1} frames/s at batch 1", fps1);
    if let Some((p50, fps)) = batched {
        println!(
            "  batched     {p50:.2} ms/frame p50, {fps:.1} frames/s at batch {}",
            args.batch
        );
    }
    println!(
        "  bank        {} x {} ({:.2} MB f32), search: {}",
        bank.rows(),
        bank.dims(),
        bank.bytes() as f64 / 1e6,
        figures["search"].as_str().unwrap_or("?")
    );
    println!("  peak RSS    {:.1} MB", peak_rss_bytes() as f64 / 1e6);
    if let Some(path) = args.json {
        std::fs::write(&path, serde_json::to_string_pretty(&figures)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}
