//! `cloud-hub rollouts create|list|show|pause|resume|abort`: staged rollouts, planned and
//! steered on the hub's database (the running hub's driver, [`crate::rollout_driver`],
//! carries them out within a few seconds). Every command is in the audit trail.

use crate::admin_cmd::{actor, DatabaseArgs};
use crate::db::rollouts::{RolloutDeviceRow, RolloutRow};
use crate::rollout::{Gates, Phase};
use crate::rollout_driver::Plan;
use crate::table::{time, Table};
use anyhow::{Context, Result};
use clap::{Args, Subcommand};

/// `cloud-hub rollouts ...`.
#[derive(Subcommand, Debug)]
pub enum RolloutsCommand {
    /// Plan a staged rollout of a registry bundle to a site's devices: a canary phase,
    /// then waves; each phase soaks and needs frames scored before the next, and stops
    /// (rolling back every device that took it) on failed installs or changed behaviour.
    Create(CreateArgs),
    /// Every rollout, newest first.
    List {
        #[command(flatten)]
        db: DatabaseArgs,
    },
    /// One rollout: its state, the behaviour figures against their limits, each device's
    /// steps.
    Show {
        /// Rollout id.
        id: String,
        #[command(flatten)]
        db: DatabaseArgs,
    },
    /// Hold a running rollout on its phase (nothing more is assigned).
    Pause {
        /// Rollout id.
        id: String,
        #[command(flatten)]
        db: DatabaseArgs,
    },
    /// Resume a held rollout, or approve the next phase of one waiting for approval.
    Resume {
        /// Rollout id.
        id: String,
        #[command(flatten)]
        db: DatabaseArgs,
    },
    /// Stop a rollout and roll back every device that took it (the emergency stop).
    Abort {
        /// Rollout id.
        id: String,
        #[command(flatten)]
        db: DatabaseArgs,
    },
}

/// What `rollouts create` is told.
#[derive(Args, Debug)]
pub struct CreateArgs {
    /// Bundle version (in the registry: `cloud-hub models upload`).
    #[arg(long)]
    pub bundle: String,
    /// Site of the devices.
    #[arg(long)]
    pub site: String,
    /// Device (repeat for several, in canary-first order); absent: every device the hub
    /// knows at the site, by name.
    #[arg(long = "device")]
    pub devices: Vec<String>,
    /// Devices of the canary phase.
    #[arg(long, default_value_t = 1)]
    pub canary: usize,
    /// The waves after the canary, as cumulative percentages of the other devices.
    #[arg(long, value_delimiter = ',', default_value = "25,100")]
    pub waves: Vec<f64>,
    /// Seconds each phase soaks after its last ack.
    #[arg(long, default_value_t = 600.0)]
    pub soak_s: f64,
    /// Frames each device must score on the new bundle before its phase may succeed.
    #[arg(long, default_value_t = 200)]
    pub min_frames: u64,
    /// Latest frames per device compared before and after the update.
    #[arg(long, default_value_t = 1000)]
    pub window_frames: u64,
    /// Wait for a fleet manager's `rollouts resume` after the canary.
    #[arg(long)]
    pub pause_after_canary: bool,
    /// Abort above this share of a phase's devices failing to install.
    #[arg(long, default_value_t = Gates::default().max_failed_share)]
    pub max_failed_share: f64,
    /// Abort above this escalation-rate ratio (after / before).
    #[arg(long, default_value_t = Gates::default().max_escalation_ratio)]
    pub max_escalation_ratio: f64,
    /// Abort above this shift of the score median, in calibration spreads.
    #[arg(long, default_value_t = Gates::default().max_median_shift)]
    pub max_median_shift: f64,
    /// Abort above this shift of the score 99th percentile, in calibration spreads.
    #[arg(long, default_value_t = Gates::default().max_p99_shift)]
    pub max_p99_shift: f64,
    /// Abort above this two-sample Kolmogorov-Smirnov statistic.
    #[arg(long, default_value_t = Gates::default().max_ks)]
    pub max_ks: f64,
    /// Base URL devices fetch the files from (default: the hub's HTTP listener).
    #[arg(long, env = "HUB_PUBLIC_URL")]
    pub public_url: Option<String>,
    #[command(flatten)]
    pub db: DatabaseArgs,
}

/// The phases of `devices`: the first `canary`, then one phase per cumulative wave share
/// of the rest (empty phases left out; the last wave always takes what remains).
pub fn phases(
    devices: &[String],
    canary: usize,
    waves: &[f64],
    soak_ms: i64,
    min_frames: u64,
    pause_after_canary: bool,
) -> Vec<Phase> {
    let canary = canary.clamp(1, devices.len().max(1)).min(devices.len());
    let (first, rest) = devices.split_at(canary);
    let phase = |devices: &[String], pause_after: bool| Phase {
        devices: devices.to_vec(),
        soak_ms,
        min_frames,
        pause_after,
    };
    let mut out = vec![phase(first, pause_after_canary)];
    let mut taken = 0;
    for (i, share) in waves.iter().enumerate() {
        let upto = if i + 1 == waves.len() {
            rest.len()
        } else {
            ((share.clamp(0.0, 100.0) / 100.0) * rest.len() as f64).ceil() as usize
        };
        let upto = upto.clamp(taken, rest.len());
        if upto > taken {
            out.push(phase(&rest[taken..upto], false));
            taken = upto;
        }
    }
    if taken < rest.len() {
        out.push(phase(&rest[taken..], false));
    }
    out
}

async fn create(a: CreateArgs) -> Result<()> {
    let config = a.db.resolve()?;
    let db = a.db.open().await?;
    db.bundle(&a.bundle).await?.with_context(|| {
        format!(
            "no bundle {} in the registry: upload it first (`cloud-hub models upload`)",
            a.bundle
        )
    })?;
    insp_proto::check_name("site", &a.site).map_err(anyhow::Error::msg)?;
    let devices = if a.devices.is_empty() {
        db.site_devices(&a.site).await?
    } else {
        a.devices.clone()
    };
    anyhow::ensure!(
        !devices.is_empty(),
        "no device at site {:?}: name them with --device",
        a.site
    );
    for d in &devices {
        insp_proto::check_name("device", d).map_err(anyhow::Error::msg)?;
    }
    if let Some(busy) = db
        .rollouts(true)
        .await?
        .into_iter()
        .find(|r| r.site == a.site)
    {
        anyhow::bail!(
            "rollout {} of {} is still {} at site {}: abort it or let it finish first",
            busy.id,
            busy.version,
            busy.state,
            busy.site
        );
    }
    let phases = phases(
        &devices,
        a.canary,
        &a.waves,
        (a.soak_s * 1e3) as i64,
        a.min_frames,
        a.pause_after_canary,
    );
    // What each device ran before: what a rollback puts back.
    let models = db.device_models().await?;
    let known = db.devices().await?;
    let previous = |d: &str| {
        models
            .iter()
            .find(|m| m.site == a.site && m.device == d)
            .and_then(|m| m.running_version.clone())
            .or_else(|| {
                known
                    .iter()
                    .find(|k| k.site == a.site && k.device == d)
                    .map(|k| k.model_version.clone())
            })
            .unwrap_or_default()
    };
    let rows: Vec<RolloutDeviceRow> = phases
        .iter()
        .enumerate()
        .flat_map(|(n, p)| p.devices.iter().map(move |d| (n, d)))
        .map(|(n, d)| RolloutDeviceRow {
            site: a.site.clone(),
            device: d.clone(),
            phase: n as i64,
            previous_version: previous(d),
            assigned_unix_ms: None,
            acked_unix_ms: None,
            failed_reason: None,
            rolled_back_unix_ms: None,
        })
        .collect();
    let plan = Plan {
        phases: phases.clone(),
        gates: Gates {
            max_failed_share: a.max_failed_share,
            max_escalation_ratio: a.max_escalation_ratio,
            max_median_shift: a.max_median_shift,
            max_p99_shift: a.max_p99_shift,
            max_ks: a.max_ks,
        },
        public_url: crate::registry_cmd::public_url(&config, a.public_url.as_deref())?,
        window_frames: a.window_frames.max(1),
    };
    let now = crate::db::unix_ms();
    let id = format!("r-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let row = RolloutRow {
        id: id.clone(),
        version: a.bundle.clone(),
        site: a.site.clone(),
        plan: serde_json::to_string(&plan)?,
        state: "running".into(),
        phase: 0,
        reason: String::new(),
        request: String::new(),
        figures: String::new(),
        created_by: actor(),
        created_unix_ms: now,
        updated_unix_ms: now,
    };
    db.create_rollout(&actor(), &row, &rows).await?;
    println!("{id}");
    for (n, p) in phases.iter().enumerate() {
        eprintln!(
            "phase {n} ({}): {}",
            if n == 0 { "canary" } else { "wave" },
            p.devices.join(", ")
        );
    }
    eprintln!(
        "the hub assigns the canary within seconds; follow it with `cloud-hub rollouts show {id}`"
    );
    Ok(())
}

async fn show(id: &str, db: &DatabaseArgs) -> Result<()> {
    let db = db.open().await?;
    let r = db
        .rollout(id)
        .await?
        .with_context(|| format!("no rollout {id}"))?;
    let plan: Plan = serde_json::from_str(&r.plan).context("damaged plan")?;
    println!("rollout     {}", r.id);
    println!("bundle      {}", r.version);
    println!("site        {}", r.site);
    println!(
        "state       {} (phase {} of {})",
        r.state,
        r.phase,
        plan.phases.len()
    );
    if !r.reason.is_empty() {
        println!("reason      {}", r.reason);
    }
    if !r.request.is_empty() {
        println!(
            "requested   {} (the hub takes it up within seconds)",
            r.request
        );
    }
    println!(
        "created     {} by {}",
        time(r.created_unix_ms),
        r.created_by
    );
    if let Ok(f) = serde_json::from_str::<crate::rollout::Figures>(&r.figures) {
        let g = plan.gates;
        println!(
            "behaviour   escalation ratio {:.2} (limit {}), median shift {:.2} (limit {}), \
             p99 shift {:.2} (limit {}), KS {:.3} (limit {})",
            f.escalation_ratio,
            g.max_escalation_ratio,
            f.median_shift,
            g.max_median_shift,
            f.p99_shift,
            g.max_p99_shift,
            f.ks,
            g.max_ks
        );
    }
    let mut t = Table::new(&[
        "PHASE",
        "DEVICE",
        "PREVIOUS",
        "ASSIGNED",
        "ACKED",
        "REFUSED",
        "ROLLED BACK",
    ]);
    let when = |t: Option<i64>| t.map(time).unwrap_or_else(|| "-".into());
    for d in db.rollout_devices(id).await? {
        t.row(vec![
            d.phase.to_string(),
            d.device,
            d.previous_version,
            when(d.assigned_unix_ms),
            when(d.acked_unix_ms),
            d.failed_reason.unwrap_or_else(|| "-".into()),
            when(d.rolled_back_unix_ms),
        ]);
    }
    print!("{}", t.render());
    Ok(())
}

/// Runs a `rollouts` command.
pub async fn run(command: RolloutsCommand) -> Result<()> {
    match command {
        RolloutsCommand::Create(a) => create(a).await,
        RolloutsCommand::List { db } => {
            let db = db.open().await?;
            let mut t = Table::new(&[
                "ID", "BUNDLE", "SITE", "STATE", "PHASE", "CREATED", "REASON",
            ]);
            for r in db.rollouts(false).await? {
                t.row(vec![
                    r.id,
                    r.version,
                    r.site,
                    r.state,
                    r.phase.to_string(),
                    time(r.created_unix_ms),
                    r.reason,
                ]);
            }
            print!("{}", t.render());
            Ok(())
        }
        RolloutsCommand::Show { id, db } => show(&id, &db).await,
        RolloutsCommand::Pause { id, db } => request(&id, &db, "pause").await,
        RolloutsCommand::Resume { id, db } => request(&id, &db, "resume").await,
        RolloutsCommand::Abort { id, db } => request(&id, &db, "abort").await,
    }
}

async fn request(id: &str, db: &DatabaseArgs, what: &str) -> Result<()> {
    let db = db.open().await?;
    anyhow::ensure!(
        db.request_rollout(&actor(), id, what).await?,
        "no running, paused or held rollout {id} (`cloud-hub rollouts list`)"
    );
    println!("{what} of {id} requested: the hub carries it out within seconds");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("cam-{i}")).collect()
    }

    #[test]
    fn canary_then_cumulative_waves() {
        let p = phases(&names(9), 1, &[25.0, 100.0], 1000, 50, true);
        let sizes: Vec<usize> = p.iter().map(|p| p.devices.len()).collect();
        assert_eq!(sizes, vec![1, 2, 6]);
        assert!(p[0].pause_after && !p[1].pause_after);
        assert_eq!(p[0].devices, vec!["cam-0".to_string()]);
        // Every device once, in order.
        let all: Vec<String> = p.into_iter().flat_map(|p| p.devices).collect();
        assert_eq!(all, names(9));
        // Waves that end short still take every device; empty ones are left out.
        let p = phases(&names(3), 2, &[10.0, 50.0], 0, 1, false);
        assert_eq!(
            p.iter().map(|p| p.devices.len()).collect::<Vec<_>>(),
            vec![2, 1]
        );
        assert_eq!(phases(&names(1), 3, &[100.0], 0, 1, false).len(), 1);
    }
}
