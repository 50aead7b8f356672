//! Times one training step of the heavy models (forward, backward, optimiser) on random
//! features of the default training batch shape, and the anomaly map of a whole frame.
//! `cargo run --release -p insp-core --example profile_heavy -- [flow|recon] [steps]`

use candle_core::{DType, Device, Tensor};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use insp_cloud::heavy::{Architecture, Network};
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    insp_core::tune_allocator();
    let args: Vec<String> = std::env::args().collect();
    let kind = args.get(1).map(String::as_str).unwrap_or("flow");
    let steps: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(5);
    let dev = Device::Cpu;
    let arch = match kind {
        "recon" => Architecture::Recon(Default::default()),
        _ => Architecture::Flow(Default::default()),
    };
    let channels = [40usize, 112];
    let map = VarMap::new();
    let net = Network::load(
        VarBuilder::from_varmap(&map, DType::F32, &dev),
        &arch,
        &channels,
    )?;
    let mut opt = candle_nn::AdamW::new_lr(map.all_vars(), 1e-4)?;
    let (b, c) = (4, 32);
    let x = vec![
        Tensor::randn(0f32, 1.0, (b, c, c, 40), &dev)?,
        Tensor::randn(0f32, 1.0, (b, c / 2, c / 2, 112), &dev)?,
    ];
    let (mut tf, mut tb, mut to) = (0.0, 0.0, 0.0);
    for _ in 0..steps {
        let t0 = Instant::now();
        let loss = match &net {
            Network::Flow(f) => f.loss(&x)?,
            Network::Recon(r) => {
                let cat = insp_cloud::heavy::concat_at_finest(&x)?;
                r.loss(&r.forward(&cat)?, &cat)?.total
            }
        };
        let t1 = Instant::now();
        let grads = loss.backward()?;
        let t2 = Instant::now();
        opt.step(&grads)?;
        let t3 = Instant::now();
        tf += (t1 - t0).as_secs_f64();
        tb += (t2 - t1).as_secs_f64();
        to += (t3 - t2).as_secs_f64();
    }
    let n = steps as f64;
    println!(
        "{kind}: forward {:.0} ms, backward {:.0} ms, optimiser {:.0} ms per step",
        tf / n * 1e3,
        tb / n * 1e3,
        to / n * 1e3
    );
    let frame = vec![
        Tensor::randn(0f32, 1.0, (1, 32, 32, 40), &dev)?,
        Tensor::randn(0f32, 1.0, (1, 16, 16, 112), &dev)?,
    ];
    let t = Instant::now();
    for _ in 0..steps {
        net.anomaly_map(&frame)?;
    }
    println!(
        "{kind}: map of a 32 x 32 frame {:.1} ms",
        t.elapsed().as_secs_f64() / n * 1e3
    );
    Ok(())
}
