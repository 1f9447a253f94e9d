//! The manager's loop (`vigil manager`): win the election, keep the plan table current, watch
//! the hosts' leases, and on a failure fence the host, look its plan up and drive it through
//! the agents by rewriting the VMs' desired state. Nothing is computed between the failure
//! and the plan's execution; the table for the new configuration is computed afterwards, in
//! the background.

use crate::detector::Detector;
use crate::election::{Election, Role};
use crate::runtime::{initial_targets, Layout};
use crate::table::{key, plan_name, Table};
use agent::cluster::{self, CopyState, Desired, Event, Fence, Placed, Progress};
use model::Loaded;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::mpsc::{channel, Receiver, TryRecvError};
use std::time::{Duration, Instant};

/// How a manager runs.
#[derive(Debug, Clone)]
pub struct Config {
    /// This manager's id in the election.
    pub id: String,
    pub store: PathBuf,
    /// Election renewal period.
    pub period: Duration,
    /// How often the leader reads the hosts' heartbeats (detection is within the lease plus
    /// this).
    pub poll: Duration,
    /// Lease of the leader and of the hosts.
    pub lease: Duration,
    /// Grace for hosts never heard from since this manager began to lead.
    pub grace: Duration,
    /// Fault scenarios of up to this many hosts are planned from the initial configuration.
    pub faults: usize,
}

/// The election as its thread last left it.
#[derive(Default)]
struct Standing {
    /// The generation this manager leads with, if it leads.
    generation: Option<u64>,
    /// Whether it may act now ([`Election::may_act`], as of the last step).
    renewed: Option<Instant>,
    /// The last step's error, for the log.
    error: Option<String>,
}

/// Runs the manager's side of the election every period on a thread and a store connection of
/// its own, so that the leader's work — many store requests, which wait for the store's disk
/// — never delays the renewal of its lead (a standby would take the lead from a leader merely
/// busy). The leader may act only within half a lease of its last renewal, as before.
fn elect(cfg: &Config, standing: std::sync::Arc<std::sync::Mutex<Standing>>) -> agent::Result<()> {
    let mut store = store::Client::connect(&cfg.store)?;
    store.set_retry_for(cfg.lease / 2);
    store.set_request_timeout(cfg.lease / 2);
    let (id, lease, period) = (cfg.id.clone(), cfg.lease, cfg.period);
    std::thread::Builder::new()
        .name("election".into())
        .spawn(move || {
            let mut election = Election::new(id, lease);
            loop {
                let t0 = Instant::now();
                let step = election.step(&mut store);
                {
                    let mut st = standing.lock().unwrap_or_else(|p| p.into_inner());
                    match step {
                        Ok(Role::Leader { generation, .. }) => {
                            st.generation = Some(generation);
                            st.renewed = Some(t0);
                        }
                        Ok(Role::Standby { .. }) => *st = Standing::default(),
                        Err(e) => st.error = Some(e.to_string()),
                    }
                }
                std::thread::sleep(period.saturating_sub(t0.elapsed()));
            }
        })
        .map_err(|e| agent::Error::io("cannot start the election thread of", &cfg.store, e))?;
    Ok(())
}

/// Runs the manager until killed.
pub fn run(cfg: &Config, loaded: &Loaded, layout: &Layout) -> agent::Result<()> {
    let mut store = store::Client::connect(&cfg.store)?;
    store.set_retry_for(cfg.lease / 2);
    store.set_request_timeout(cfg.lease / 2);
    let standing = std::sync::Arc::new(std::sync::Mutex::new(Standing::default()));
    elect(cfg, std::sync::Arc::clone(&standing))?;
    let mut lead: Option<Lead> = None;
    let clock = Instant::now();
    loop {
        let t0 = Instant::now();
        let (generation, may_act) = {
            let mut st = standing.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(e) = st.error.take() {
                tracing::warn!("manager {}: election: {e}", cfg.id);
            }
            (st.generation, st.generation.is_some() && st.renewed.is_some_and(|t| t.elapsed() < cfg.lease / 2))
        };
        match generation {
            Some(g) if lead.as_ref().is_none_or(|l| l.generation != g) => {
                let _ = cluster::log_event(&mut store, &Event::now(&cfg.id, format!("manager leads with generation {g}")));
                lead = Some(Lead::start(cfg, loaded, layout, &mut store, g, clock)?);
            }
            Some(_) => {}
            None => lead = None,
        }
        if let Some(l) = lead.as_mut() {
            if may_act {
                if let Err(e) = l.step(cfg, loaded, layout, &mut store, clock) {
                    tracing::warn!("manager {}: {e}", cfg.id);
                }
            }
        }
        let mut next = t0 + if lead.is_some() { cfg.poll } else { cfg.period };
        // A lease that expires before the next reading is read again right then: a failure is
        // found at its lease, not up to a polling period later.
        if let Some(expiry) = lead.as_ref().and_then(|l| l.detector.next_expiry()) {
            next = next.min(clock + Duration::from_nanos(expiry));
        }
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
}

/// Fault injection for tests: `VIGIL_MANAGER_CRASH=WHO:N` makes the manager WHO (its id, or
/// `g<generation>` for whichever leads with that generation) die (abort, like a SIGKILL) right
/// after the N-th desired record of a plan, halfway through it.
fn crash_point(id: &str, generation: u64, done: usize) {
    let Ok(spec) = std::env::var("VIGIL_MANAGER_CRASH") else { return };
    let me = |who: &str| who == id || who == format!("g{generation}");
    if spec.split_once(':').is_some_and(|(who, n)| me(who) && n.parse() == Ok(done)) {
        tracing::error!("manager {id}: crashing after {done} action(s) of the plan (VIGIL_MANAGER_CRASH)");
        std::process::abort();
    }
}

/// Lowers the calling thread's priority (nice 10; threads it starts inherit it): a plan table
/// computed in the background must not starve the manager's own loop, the store or the
/// agents on a small machine.
fn background() {
    // SAFETY: setpriority(2) on the calling thread (who = 0 is the caller's thread id on
    // Linux); it only changes a scheduling attribute.
    unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 10) };
}

/// How often the leader compares the VMs' measured execution times with the model.
pub const DRIFT_CHECK: Duration = Duration::from_millis(250);

/// The leader's state: rebuilt from the store each time this manager takes the lead.
struct Lead {
    generation: u64,
    failed: Vec<String>,
    table: Table,
    detector: Detector,
    /// A table being computed in the background, and why (logged with its verdicts).
    pending: Option<Receiver<Result<Table, String>>>,
    pending_why: Option<String>,
    /// When the heartbeats were last read.
    last_round: Option<Instant>,
    /// The store client's reconnections then: a new connection may be to a restarted store,
    /// which lost the heartbeats' last (volatile) values.
    last_reconnects: u64,
    /// Execution times and arrivals observed above the model's, and the model with them
    /// substituted, which every plan table is computed from once there is one.
    observed: crate::drift::Observed,
    model: Option<Loaded>,
    last_drift_check: Instant,
    /// The upper arrival curves of the VMs' compared tasks under the plan in force (for the
    /// scenario named), and the largest excess already alerted per VM under it (a burst is
    /// alerted again when its excess doubles).
    arrival_curves: Option<(String, BTreeMap<String, rtc::Curve>)>,
    burst_alerted: BTreeMap<String, u64>,
    /// Chains whose measured latency was reported above their bound, by plan, with the
    /// latency reported (again when it doubles).
    above_alerted: BTreeMap<String, f64>,
    /// When the placement in force last changed (or this manager began to lead): latencies
    /// measured before [`SETTLE`] has passed belong to the change (VMs starting, backups
    /// synchronising), which the analysis does not cover.
    settled_from: Instant,
    /// Migrations whose source stopped with no copy running on the destination, since when.
    stalled_migrations: BTreeMap<String, Instant>,
    /// The checkpoint intervals of `policy = "analysed"` VMs, chosen again from their
    /// measured pauses ([`crate::interval`]); every desired record is written with them.
    intervals: crate::interval::Adapter,
    last_interval_check: Instant,
}

/// How often the leader reads the protected VMs' replication figures (their primaries write
/// them once a second).
pub const INTERVAL_CHECK: Duration = Duration::from_secs(1);

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// The intervals to start from: what a previous leader chose (in the store), else the
/// analysis of the declared values (`layout.analysed`).
fn start_intervals(loaded: &Loaded, layout: &Layout, store: &mut store::Client) -> agent::Result<crate::interval::Adapter> {
    use crate::interval::Chosen;
    let stored: BTreeMap<String, Chosen> = cluster::read(store, cluster::INTERVALS)?.unwrap_or_default();
    let mut a = crate::interval::Adapter::default();
    for (vm, spec) in &layout.analysed {
        let kept = stored.get(vm).filter(|c| c.policy.parse::<replication::PolicySpec>().is_ok());
        let chosen = match kept {
            Some(c) => c.clone(),
            None => {
                let c = loaded.deployment.as_ref().and_then(|d| d.vms.iter().find(|v| v.name == *vm)).and_then(|v| v.checkpoint.as_ref());
                let us = |q: Option<&rtc::Q>| q.map_or(0.0, rtc::Q::to_f64);
                let (pause_us, ack_us) = (us(c.and_then(|c| c.pause.as_ref())), us(c.and_then(|c| c.ack.as_ref())));
                let t = match spec {
                    replication::PolicySpec::Fixed { interval_ns } => rtc::Q::int((*interval_ns / 1000) as i64),
                    _ => continue,
                };
                let hold_us = model::replication::fixed_interval(loaded, vm, &t, None).ok().flatten().map_or(0.0, |(_, h)| h.to_f64());
                Chosen {
                    policy: spec.to_string(),
                    pause_us,
                    ack_us,
                    hold_us,
                    at_ms: now_ms(),
                    why: "the declared pause and acknowledgement".into(),
                }
            }
        };
        a.track(vm, chosen);
    }
    Ok(a)
}

/// How long a migration whose source stopped waits for the destination to take over before
/// it is abandoned (the destination takes over within the replication timeout and lease,
/// about 220 ms under `vigil up`, if it holds a replica at all).
pub const MIGRATION_TAKEOVER_WAIT: Duration = Duration::from_secs(2);

/// How long after a change of placement measured latencies are not held against the bounds.
pub const SETTLE: Duration = Duration::from_secs(3);

impl Lead {
    fn start(
        cfg: &Config,
        loaded: &Loaded,
        layout: &Layout,
        store: &mut store::Client,
        generation: u64,
        clock: Instant,
    ) -> agent::Result<Lead> {
        let hosts: Vec<String> = loaded.deployment.as_ref().map(|d| d.hosts.iter().map(|h| h.name.clone()).collect()).unwrap_or_default();
        let now = clock.elapsed().as_nanos() as u64;
        let mut detector = Detector::new(hosts.iter().cloned(), cfg.lease.as_nanos() as u64, cfg.grace.as_nanos() as u64, now);
        let progress: Option<Progress> = cluster::read(store, cluster::PROGRESS)?;
        let failed = progress.as_ref().map(|p| p.failed.clone()).unwrap_or_default();
        for h in &failed {
            detector.mark_failed(h);
        }
        // What a predecessor observed above the model: the model to plan with.
        let observed: crate::drift::Observed = cluster::read(store, cluster::OBSERVED)?.unwrap_or_default();
        let model = (!observed.is_empty()).then(|| observed.model(loaded).0);
        if !observed.is_empty() {
            let mut list: Vec<String> = observed.exec_us.iter().map(|(vm, us)| format!("{vm} {us:.0} µs")).collect();
            list.extend(observed.arrivals.keys().map(|vm| format!("the arrivals at {vm}")));
            let _ = cluster::log_event(
                store,
                &Event::now(&cfg.id, format!("planning with the execution times observed before this leader: {}", list.join(", "))),
            );
        }
        // The checkpoint intervals in force (`policy = "analysed"`): the plan counts their holds.
        let intervals = start_intervals(loaded, layout, store)?;
        let kept: Vec<String> = cluster::read::<BTreeMap<String, crate::interval::Chosen>>(store, cluster::INTERVALS)?
            .unwrap_or_default()
            .iter()
            .filter(|(vm, c)| intervals.chosen(vm).is_some_and(|x| x == *c))
            .map(|(vm, c)| format!("{vm} {} (output held at most {:.2} ms)", c.policy, c.hold_us / 1e3))
            .collect();
        if !kept.is_empty() {
            let _ = cluster::log_event(
                store,
                &Event::now(&cfg.id, format!("checkpoint intervals chosen before this leader: {}", kept.join(", "))),
            );
        }
        let planning = &crate::interval::apply(model.as_ref().unwrap_or(loaded), intervals.all()).0;
        let mut table = Table::load(store)?;
        let current = table.meta.as_ref().is_some_and(|m| m.failed == key(&failed));
        // The table in the store has the plan for the configuration in force (a predecessor
        // computed it, before or after the failures): use it at once, and bring the table up
        // to date in the background if it was computed for an earlier configuration.
        let usable = table.lookup(&failed).is_some();
        let mut pending = None;
        if usable && !current {
            let (tx, rx) = channel();
            let (loaded2, failed2, faults) = (planning.clone(), failed.clone(), cfg.faults);
            std::thread::spawn(move || {
                background();
                let _ = tx.send(Table::compute(&loaded2, &failed2, faults, generation).map_err(|e| e.to_string()));
            });
            pending = Some(rx);
        }
        if !usable {
            // No plan for this configuration yet (first start): compute the table before
            // anything can fail, and keep it.
            let t0 = Instant::now();
            table =
                Table::compute(planning, &failed, cfg.faults, generation).map_err(|e| agent::Error::Cluster(format!("planning: {e}")))?;
            table.save(store)?;
            let _ = cluster::log_event(
                store,
                &Event::now(
                    &cfg.id,
                    format!("plan table computed: {} scenarios in {:.0} ms", table.plans.len(), t0.elapsed().as_secs_f64() * 1e3),
                ),
            );
        }
        let mut lead = Lead {
            intervals,
            last_interval_check: Instant::now(),
            generation,
            failed: failed.clone(),
            table,
            detector,
            pending,
            pending_why: None,
            last_round: None,
            last_reconnects: 0,
            observed,
            model,
            last_drift_check: Instant::now(),
            stalled_migrations: BTreeMap::new(),
            arrival_curves: None,
            burst_alerted: Default::default(),
            above_alerted: Default::default(),
            settled_from: Instant::now(),
        };
        let layout = &lead.layout(layout);
        // Finish a plan a previous leader began, or place the VMs for the first time.
        let any_desired =
            cluster::children(store, cluster::VMS)?.iter().any(|vm| store.try_read(&cluster::desired_path(vm)).ok().flatten().is_some());
        match progress {
            Some(p) if p.done < p.total => {
                let _ = cluster::log_event(
                    store,
                    &Event::now(
                        &cfg.id,
                        format!("finishing plan {} ({}/{} done by generation {})", p.scenario, p.done, p.total, p.generation),
                    ),
                );
                lead.execute(cfg, loaded, layout, store, &p.failed.clone(), Instant::now())?;
            }
            _ if !any_desired => {
                let (desired, _) = layout.desired(loaded, &initial_targets(loaded), &[], &lead.table, generation, &BTreeMap::new());
                for (vm, d) in &desired {
                    cluster::write(store, &cluster::desired_path(vm), d)?;
                }
                let _ = cluster::log_event(store, &Event::now(&cfg.id, format!("{} VM(s) placed as the model says", desired.len())));
            }
            _ => {}
        }
        Ok(lead)
    }

    /// What plan tables are computed from: the model with what was observed (execution times,
    /// arrivals) and the checkpoint intervals in force, with their pauses and holds.
    fn planning_model(&self, loaded: &Loaded) -> Loaded {
        crate::interval::apply(self.model.as_ref().unwrap_or(loaded), self.intervals.all()).0
    }

    /// Computes the plan table from [`Lead::planning_model`] in the background (a computation
    /// still running is superseded, and its reason kept with this one's).
    fn recompute_table(&mut self, cfg: &Config, loaded: &Loaded, why: String) {
        let (tx, rx) = channel();
        let (model, failed, faults, generation) = (self.planning_model(loaded), self.failed.clone(), cfg.faults, self.generation);
        std::thread::spawn(move || {
            background();
            let _ = tx.send(Table::compute(&model, &failed, faults, generation).map_err(|e| e.to_string()));
        });
        self.pending = Some(rx);
        self.pending_why = Some(match self.pending_why.take() {
            Some(before) if before != why => format!("{before}; {why}"),
            _ => why,
        });
    }

    /// `base` with the checkpoint intervals in force (`policy = "analysed"` as adapted).
    fn layout(&self, base: &Layout) -> Layout {
        let mut l = base.clone();
        for vm in self.intervals.vms() {
            if let Some(p) = self.intervals.chosen(vm).and_then(|c| c.policy.parse::<replication::PolicySpec>().ok()) {
                l.analysed.insert(vm.clone(), p);
            }
        }
        l
    }

    /// Chooses the `analysed` VMs' checkpoint intervals again from their measured pauses and
    /// acknowledgements ([`crate::interval`]), with the model in force (observed execution
    /// times and arrivals included); a new interval goes into the VM's desired record (its
    /// primary's policy, and its backup's after a takeover), where its agent applies it to the
    /// running driver without a new synchronisation.
    fn check_intervals(&mut self, cfg: &Config, loaded: &Loaded, store: &mut store::Client) -> agent::Result<()> {
        use crate::interval::Decision;
        let vms: Vec<String> = self.intervals.vms().cloned().collect();
        for vm in vms {
            let Some(mut d) = cluster::read::<Desired>(store, &cluster::desired_path(&vm))? else { continue };
            let Some(p) = d.primary.as_ref().filter(|p| !self.failed.contains(&p.host) && p.migrate_to.is_none()) else { continue };
            let a = cluster::read::<agent::cluster::Actual>(store, &cluster::actual_path(&vm, &p.host))?;
            let Some(a) = a.filter(|a| a.state == CopyState::Running && a.protected == Some(true)) else {
                self.intervals.unprotected(&vm, now_ms());
                continue;
            };
            if let Some(f) = &a.replication {
                self.intervals.observe(&vm, f);
            }
            let t0 = Instant::now();
            let decision = match self.intervals.decide(self.model.as_ref().unwrap_or(loaded), &vm, now_ms()) {
                Ok(Some(x)) => x,
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!("manager {}: {vm}: checkpoint interval: {e}", cfg.id);
                    continue;
                }
            };
            let took = t0.elapsed().as_secs_f64() * 1e3;
            let what = match &decision {
                Decision::Switch { from, to } => {
                    let Ok(spec) = to.policy.parse::<replication::PolicySpec>() else { continue };
                    if let Some(pr) = d.primary.as_mut().and_then(|p| p.spec.protection.as_mut()) {
                        pr.policy = spec;
                    }
                    if let Some(b) = d.backup.as_mut() {
                        b.spec.then_policy = spec;
                    }
                    d.generation = self.generation;
                    cluster::write(store, &cluster::desired_path(&vm), &d)?;
                    format!(
                        "{vm}: checkpoint interval {from} → {} ({}); with them {} keeps every deadline, output held at most {:.2} ms (analysed in {took:.0} ms)",
                        to.policy,
                        to.why,
                        to.policy,
                        to.hold_us / 1e3
                    )
                }
                Decision::Rebased { basis } => format!(
                    "{vm}: checkpoint interval {} kept ({}); output held at most {:.2} ms (analysed in {took:.0} ms)",
                    basis.policy,
                    basis.why,
                    basis.hold_us / 1e3
                ),
                Decision::NoneHolds { policy, pause_us, ack_us } => format!(
                    "ALERT: {vm}: no fixed checkpoint interval keeps every deadline with the measured pause {:.3} ms and backup acknowledgement {:.3} ms (margin included): {policy} stays",
                    pause_us / 1e3,
                    ack_us / 1e3
                ),
            };
            tracing::info!("manager {}: {what}", cfg.id);
            let _ = cluster::log_event(store, &Event::now(&cfg.id, what));
            // The plan table counts the interval's pause and hold: computed again with them.
            match &decision {
                Decision::Switch { to, .. } => {
                    self.recompute_table(cfg, loaded, format!("with the checkpoint interval {} of {vm}", to.policy));
                    self.arrival_curves = None;
                }
                Decision::Rebased { basis } => {
                    self.recompute_table(cfg, loaded, format!("with the measured pauses of {vm} under {}", basis.policy));
                    self.arrival_curves = None;
                }
                Decision::NoneHolds { .. } => {}
            }
            let all: BTreeMap<String, crate::interval::Chosen> =
                self.intervals.vms().filter_map(|v| Some((v.clone(), self.intervals.chosen(v)?.clone()))).collect();
            cluster::write(store, cluster::INTERVALS, &all)?;
        }
        Ok(())
    }

    fn step(&mut self, cfg: &Config, loaded: &Loaded, layout: &Layout, store: &mut store::Client, clock: Instant) -> agent::Result<()> {
        let layout = &self.layout(layout);
        // A table computed in the background replaces the current one.
        if let Some(rx) = &self.pending {
            match rx.try_recv() {
                Ok(Ok(t)) => {
                    t.save(store)?;
                    let ms = t.meta.as_ref().map_or(0.0, |m| m.compute_ms);
                    let why = self.pending_why.take().map(|w| format!(" {w}")).unwrap_or_default();
                    let _ = cluster::log_event(
                        store,
                        &Event::now(
                            &cfg.id,
                            format!("plan table recomputed for failed {:?}{why}: {} scenarios in {ms:.0} ms", self.failed, t.plans.len()),
                        ),
                    );
                    // What the new analysis says about the plan in force, beside the old one.
                    if !why.is_empty() {
                        let old = self.table.lookup(&self.failed).map(|p| p.chains.clone()).unwrap_or_default();
                        for c in t.lookup(&self.failed).map(|p| p.chains.clone()).unwrap_or_default() {
                            let was = old.iter().find(|o| o.chain == c.chain).and_then(|o| o.worst_ms);
                            let ms = |x: Option<f64>| x.map_or("unbounded".to_string(), |v| format!("{v:.2} ms"));
                            let verdict = match (c.worst_ms, c.deadline_ms) {
                                (Some(w), Some(d)) if w > d => format!("MISSES its deadline {d:.2} ms"),
                                (None, Some(_)) => "MISSES its deadline".to_string(),
                                _ => "holds".to_string(),
                            };
                            let _ = cluster::log_event(
                                store,
                                &Event::now(
                                    &cfg.id,
                                    format!("new plan: chain {}: bound {} (was {}): {verdict}", c.chain, ms(c.worst_ms), ms(was)),
                                ),
                            );
                        }
                    }
                    self.table = t;
                    self.pending = None;
                }
                Ok(Err(e)) => {
                    let _ = cluster::log_event(store, &Event::now(&cfg.id, format!("cannot recompute the plan table: {e}")));
                    self.pending = None;
                }
                Err(TryRecvError::Empty) => {}
                Err(TryRecvError::Disconnected) => self.pending = None,
            }
        }
        // The hosts' leases first: a failure's plan goes before the periodic checks.
        self.detect(cfg, loaded, layout, store, clock)?;
        if self.last_drift_check.elapsed() >= DRIFT_CHECK {
            self.last_drift_check = Instant::now();
            self.check_migrations(cfg, loaded, layout, store)?;
            self.check_takeovers(cfg, loaded, layout, store)?;
            self.check_drift(cfg, loaded, store)?;
        }
        if self.last_interval_check.elapsed() >= INTERVAL_CHECK {
            self.last_interval_check = Instant::now();
            self.check_intervals(cfg, loaded, store)?;
        }
        Ok(())
    }

    /// Reads the hosts' heartbeats; a host whose lease expired is fenced and the plan for the
    /// failures so far is executed (and the next table computed in the background).
    fn detect(&mut self, cfg: &Config, loaded: &Loaded, layout: &Layout, store: &mut store::Client, clock: Instant) -> agent::Result<()> {
        let hosts: Vec<String> = loaded.deployment.as_ref().map(|d| d.hosts.iter().map(|h| h.name.clone()).collect()).unwrap_or_default();
        let round = Instant::now();
        let mut beats = Vec::with_capacity(hosts.len());
        for h in &hosts {
            beats.push(cluster::read_counter(store, &cluster::heartbeat_path(h))?);
        }
        let now = clock.elapsed().as_nanos() as u64;
        // Reads that took long, or a long time since the last good round, mean this manager
        // could not see the heartbeats: restart every lease rather than fail hosts for it.
        let gap = self.last_round.map_or(Duration::ZERO, |t| t.elapsed());
        if round.elapsed() > cfg.lease / 4 || gap > cfg.lease / 4 + cfg.poll {
            self.detector.restart_leases(now);
            tracing::warn!(
                "manager {}: the store was slow ({:.0} ms since the last reading): leases restarted",
                cfg.id,
                gap.as_secs_f64() * 1e3
            );
        }
        // The store answers heartbeat writes before they are durable: one that restarted may
        // have lost renewals an agent counts on (the value it shows may be one this manager
        // already saw). Every lease restarts with a new connection.
        if store.reconnects() != self.last_reconnects {
            self.last_reconnects = store.reconnects();
            self.detector.restart_leases(now);
            tracing::warn!("manager {}: reconnected to the store: leases restarted", cfg.id);
        }
        self.last_round = Some(Instant::now());
        for (h, beat) in hosts.iter().zip(beats) {
            self.detector.observe(h, beat, now);
        }
        let expired = self.detector.expired(clock.elapsed().as_nanos() as u64);
        if expired.is_empty() {
            return Ok(());
        }
        let detected = Instant::now();
        for h in &expired {
            cluster::write(store, &cluster::fence_path(h), &Fence { generation: self.generation })?;
            let _ = cluster::log_event(
                store,
                &Event::now(&cfg.id, format!("host {h} failed: lease expired; fenced at generation {}", self.generation)),
            );
        }
        let mut failed = self.failed.clone();
        failed.extend(expired);
        let failed = key(&failed);
        self.execute(cfg, loaded, layout, store, &failed, detected)?;
        // The next table, for the configuration now in force, in the background.
        let (tx, rx) = channel();
        let (loaded2, failed2, faults, generation) = (self.planning_model(loaded), failed.clone(), cfg.faults, self.generation);
        std::thread::spawn(move || {
            background();
            let _ = tx.send(Table::compute(&loaded2, &failed2, faults, generation).map_err(|e| e.to_string()));
        });
        self.pending = Some(rx);
        Ok(())
    }

    /// A replicated VM whose backup took over while its primary's host lives (the primary lost
    /// its lease — stalled, cut off from the arbiter, its VMM died — and was fenced): the
    /// backup runs the VM now, but the desired state still names the old primary. The VM is
    /// given the placement the plan for its primary's host's failure gives it (the backup's
    /// host, and a new backup), analysed with the rest of that plan; nothing else moves. Only
    /// a primary whose agent reports it stopped counts (a dead host's records stay stale, and
    /// its failure is the detector's).
    fn check_takeovers(&mut self, cfg: &Config, loaded: &Loaded, layout: &Layout, store: &mut store::Client) -> agent::Result<()> {
        let mut current: Option<BTreeMap<String, Desired>> = None;
        for r in &loaded.runs {
            let Some(d) = cluster::read::<Desired>(store, &cluster::desired_path(&r.vm))? else { continue };
            let (Some(p), Some(b)) = (&d.primary, &d.backup) else { continue };
            if self.failed.contains(&p.host) || self.failed.contains(&b.host) || p.migrate_to.is_some() {
                // (A migration's end looks like a takeover: `check_migrations` finishes it.)
                continue;
            }
            let state = |h: &str, store: &mut store::Client| -> agent::Result<Option<CopyState>> {
                Ok(cluster::read::<agent::cluster::Actual>(store, &cluster::actual_path(&r.vm, h))?.map(|a| a.state))
            };
            let took_over = state(&b.host, store)? == Some(CopyState::Running);
            let primary_stopped = matches!(state(&p.host, store)?, Some(CopyState::Failed | CopyState::Exited));
            if !(took_over && primary_stopped) {
                continue;
            }
            let hypothetical = key(&[self.failed.clone(), vec![p.host.clone()]].concat());
            let Some(plan) = self.table.lookup(&hypothetical).cloned() else {
                let _ = cluster::log_event(
                    store,
                    &Event::now(&cfg.id, format!("{}: its backup on {} took over, but no plan covers {} failing", r.vm, b.host, p.host)),
                );
                continue;
            };
            if current.is_none() {
                current = Some(all_desired(store)?);
            }
            let cur = current.as_ref().expect("read above");
            let (desired, _) = layout.desired(loaded, &plan.targets, &hypothetical, &self.table, self.generation, cur);
            let Some(next) = desired.get(&r.vm).filter(|n| n.primary.as_ref().is_some_and(|x| x.host == b.host)) else { continue };
            cluster::write(store, &cluster::desired_path(&r.vm), next)?;
            let _ = cluster::log_event(
                store,
                &Event::now(
                    &cfg.id,
                    format!(
                        "{}: its backup on {} took over while {} lives (the primary lost its lease): it runs on {} now, backup {} (plan {}'s placement for it)",
                        r.vm,
                        b.host,
                        p.host,
                        b.host,
                        next.backup.as_ref().map_or("none".to_string(), |x| x.host.clone()),
                        plan_name(&hypothetical),
                    ),
                ),
            );
        }
        Ok(())
    }

    /// Pre-copy migrations (`agent::migration`): a VM whose desired record still names its
    /// source with `migrate_to`, and whose copy on the destination runs it (the source handed
    /// it over, or died after the destination held a replica and the destination took over),
    /// gets the placement of the plan in force with its state on the destination: the
    /// destination's copy becomes its primary (the same process; nothing restarts). The
    /// desired record is the migration's progress in the store: a new leader finishes it the
    /// same way.
    fn check_migrations(&mut self, cfg: &Config, loaded: &Loaded, layout: &Layout, store: &mut store::Client) -> agent::Result<()> {
        let mut current: Option<BTreeMap<String, Desired>> = None;
        for r in &loaded.runs {
            let Some(d) = cluster::read::<Desired>(store, &cluster::desired_path(&r.vm))? else { continue };
            let Some((p, m)) = d.primary.as_ref().and_then(|p| Some((p, p.migrate_to.as_ref()?))) else { continue };
            let dest = cluster::read::<agent::cluster::Actual>(store, &cluster::actual_path(&r.vm, &m.host))?;
            let source = cluster::read::<agent::cluster::Actual>(store, &cluster::actual_path(&r.vm, &p.host))?;
            if dest.as_ref().map(|a| a.state) != Some(CopyState::Running) {
                // A source VMM that crashed before the destination held a replica (a live
                // host: a failed one is the plan's): the destination never takes over. Once
                // it has had the time to, the migration is abandoned — the destination's
                // backup stopped, the VM restarted on its source as its mode says.
                let crashed = source.as_ref().is_some_and(|a| a.state == CopyState::Failed) && !self.failed.contains(&p.host);
                if !crashed {
                    self.stalled_migrations.remove(&r.vm);
                    continue;
                }
                let since = *self.stalled_migrations.entry(r.vm.clone()).or_insert_with(Instant::now);
                if since.elapsed() < MIGRATION_TAKEOVER_WAIT {
                    continue;
                }
                self.stalled_migrations.remove(&r.vm);
                let back = Placed { restart: true, migrate_to: None, migrate_from: None, ..p.clone() };
                cluster::write(
                    store,
                    &cluster::desired_path(&r.vm),
                    &Desired { generation: self.generation, primary: Some(back), backup: None },
                )?;
                let _ = cluster::log_event(
                    store,
                    &Event::now(
                        &cfg.id,
                        format!(
                            "{}: migration to {} abandoned: its VMM on {} stopped before {} held a replica; restarted on {} (DEVIATION from the plan)",
                            r.vm, m.host, p.host, m.host, p.host
                        ),
                    ),
                );
                continue;
            }
            self.stalled_migrations.remove(&r.vm);
            let how = how_it_moved(source.as_ref(), dest.as_ref());
            if current.is_none() {
                current = Some(all_desired(store)?);
            }
            // The VM's state is on the destination now: the plan in force, from there.
            let mut cur = current.clone().expect("read above");
            let moved = Placed { host: m.host.clone(), spec: p.spec.clone(), restart: true, migrate_from: None, migrate_to: None };
            cur.insert(r.vm.clone(), Desired { generation: d.generation, primary: Some(moved), backup: None });
            let targets = match self.table.lookup(&self.failed) {
                Some(plan) => plan.targets.clone(),
                None => initial_targets(loaded),
            };
            let (desired, _) = layout.desired(loaded, &targets, &self.failed, &self.table, self.generation, &cur);
            let Some(next) = desired.get(&r.vm) else { continue };
            cluster::write(store, &cluster::desired_path(&r.vm), next)?;
            if let Some(c) = current.as_mut() {
                c.insert(r.vm.clone(), next.clone());
            }
            let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |t| t.as_millis() as u64);
            let _ = cluster::log_event(
                store,
                &Event::now(
                    &cfg.id,
                    format!(
                        "{}: migrated from {} to {} by pre-copy ({how}; {} ms after the plan asked for it); it runs on {} now",
                        r.vm,
                        p.host,
                        m.host,
                        now_ms.saturating_sub(m.since_ms),
                        next.primary.as_ref().map_or("no host", |x| x.host.as_str()),
                    ),
                ),
            );
        }
        Ok(())
    }

    /// Compares each running VM's measured execution times with the model: a VM whose jobs
    /// take longer than its WCET is reported (an ALERT event naming it and by how much), and
    /// the plan table is recomputed from the model with the observed times.
    fn check_drift(&mut self, cfg: &Config, loaded: &Loaded, store: &mut store::Client) -> agent::Result<()> {
        // The arrival curves the placement in force gives each VM's jobs.
        let scenario = crate::table::plan_name(&self.failed);
        if self.arrival_curves.as_ref().is_none_or(|(s, _)| *s != scenario) {
            // A new scenario starts the alerts afresh; a new model (observed values
            // substituted) keeps them, so that a burst still growing is reported (and
            // substituted) only when its excess over the new curve doubles.
            let new_scenario = self.arrival_curves.as_ref().is_some_and(|(s, _)| *s != scenario);
            let model = &self.planning_model(loaded);
            let mut curves = BTreeMap::new();
            if let Some((_, a)) = crate::dashboard::analyse(model, self.table.lookup(&self.failed)) {
                for r in &loaded.runs {
                    if let Some((t, _)) = crate::drift::compared_task(model, &r.vm) {
                        curves.insert(r.vm.clone(), a.tasks[t].input.upper.clone());
                    }
                }
            }
            self.arrival_curves = Some((scenario, curves));
            if new_scenario {
                self.burst_alerted.clear();
            }
            self.above_alerted.clear();
            self.settled_from = Instant::now();
        }
        // A measured latency above its analysed bound is a bug in the model or the analysis.
        let settled = self.settled_from.elapsed() >= SETTLE;
        if let Some(plan) = self.table.lookup(&self.failed).filter(|_| settled) {
            for c in &plan.chains {
                let Some(bound) = c.worst_ms else { continue };
                let Some(m) = cluster::read::<agent::cluster::Measured>(store, &cluster::chain_path(&c.chain))? else { continue };
                if m.window == 0 || m.max_ms <= bound || self.above_alerted.get(&c.chain).is_some_and(|&x| m.max_ms < 2.0 * x) {
                    continue;
                }
                self.above_alerted.insert(c.chain.clone(), m.max_ms);
                let _ = cluster::log_event(
                    store,
                    &Event::now(
                        &cfg.id,
                        format!(
                            "ALERT: chain {} (VM {}): measured {:.2} ms, above its analysed bound {bound:.2} ms — the model or the analysis misses something that runs",
                            c.chain, m.vm, m.max_ms
                        ),
                    ),
                );
            }
        }
        let mut found = Vec::new();
        let mut bursts = Vec::new();
        for r in &loaded.runs {
            let Some(d) = cluster::read::<agent::cluster::Desired>(store, &cluster::desired_path(&r.vm))? else { continue };
            let Some(host) = d.primary.as_ref().map(|p| p.host.clone()).filter(|h| !self.failed.contains(h)) else { continue };
            let Some(jobs) = cluster::read::<agent::cluster::Actual>(store, &cluster::actual_path(&r.vm, &host))?.and_then(|a| a.jobs)
            else {
                continue;
            };
            if let Some(d) = crate::drift::check(loaded, &r.vm, &jobs, self.observed.exec_us.get(&r.vm).copied()) {
                found.push(d);
            }
            let upper = self.arrival_curves.as_ref().and_then(|(_, c)| c.get(&r.vm));
            if let Some(b) = upper.and_then(|u| crate::drift::check_arrivals(loaded, &r.vm, &jobs, u)) {
                let excess = b.observed - b.allowed;
                if self.burst_alerted.get(&r.vm).is_none_or(|&before| excess >= 2 * before) {
                    let _ = cluster::log_event(store, &Event::now(&cfg.id, format!("ALERT: {b}")));
                    self.burst_alerted.insert(r.vm.clone(), excess);
                    self.observed.add_arrivals(&r.vm, &jobs.arrivals);
                    bursts.push(r.vm.clone());
                }
            }
        }
        if found.is_empty() && bursts.is_empty() {
            return Ok(());
        }
        for d in &found {
            let _ = cluster::log_event(store, &Event::now(&cfg.id, format!("ALERT: {d}")));
            self.observed.exec_us.insert(d.vm.clone(), d.observed_us);
        }
        cluster::write(store, cluster::OBSERVED, &self.observed)?;
        let (observed_model, changed) = self.observed.model(loaded);
        let model = crate::interval::apply(&observed_model, self.intervals.all()).0;
        if !bursts.is_empty() {
            let what = if changed.is_empty() { "nothing to substitute".to_string() } else { changed.join("; ") };
            let _ = cluster::log_event(store, &Event::now(&cfg.id, format!("with the observed arrivals: {what}")));
        }
        // What the observed times mean for what runs now: the placement in force analysed.
        let in_force = self.table.lookup(&self.failed);
        if let (Some((sys, a)), Some(p)) = (crate::dashboard::analyse(&model, in_force), in_force) {
            for (ch, r) in sys.chains.iter().zip(&a.chains) {
                let planned = p.chains.iter().find(|c| c.chain == ch.name);
                if let Some(c) = planned.filter(|c| c.status == "lost" || c.status == "given-up") {
                    let _ = cluster::log_event(
                        store,
                        &Event::now(
                            &cfg.id,
                            format!("chain {}: {} in the plan in force (its VMs do not run): not analysed", ch.name, c.status),
                        ),
                    );
                    continue;
                }
                let was = planned.and_then(|c| c.worst_ms);
                let ms = |x: Option<f64>| x.map_or("unbounded".to_string(), |v| format!("{v:.2} ms"));
                let verdict = match (r.meets_deadline, &ch.deadline) {
                    (Some(false), Some(d)) => format!("MISSES its deadline {:.2} ms", d.to_f64() / 1e3),
                    _ => "holds".to_string(),
                };
                let worst = r.worst.as_ref().map(|w| w.to_f64() / 1e3);
                let _ = cluster::log_event(
                    store,
                    &Event::now(
                        &cfg.id,
                        format!(
                            "with the observed execution times and arrivals, where the VMs run now: chain {}: bound {} (was {}): {verdict}",
                            ch.name,
                            ms(worst),
                            ms(was)
                        ),
                    ),
                );
            }
        }
        self.model = Some(observed_model);
        self.arrival_curves = None;
        let (tx, rx) = channel();
        let (failed, faults, generation) = (self.failed.clone(), cfg.faults, self.generation);
        std::thread::spawn(move || {
            background();
            let _ = tx.send(Table::compute(&model, &failed, faults, generation).map_err(|e| e.to_string()));
        });
        self.pending = Some(rx);
        let vms: Vec<&str> = found.iter().map(|d| d.vm.as_str()).collect();
        let why = match (vms.is_empty(), bursts.is_empty()) {
            (false, true) => format!("with the observed execution times of {}", vms.join(", ")),
            (true, _) => format!("with the observed arrivals at {}", bursts.join(", ")),
            (false, false) => format!("with the observed execution times of {} and the arrivals at {}", vms.join(", "), bursts.join(", ")),
        };
        // A computation still running is superseded by this one, which includes what it was for.
        self.pending_why = Some(match self.pending_why.take() {
            Some(before) if before != why => format!("{before}; {why}"),
            _ => why,
        });
        Ok(())
    }

    /// Drives the plan for `failed`: the desired records of every VM whose target changed,
    /// the progress recorded after each, so that a successor finishes what this one began.
    fn execute(
        &mut self,
        cfg: &Config,
        loaded: &Loaded,
        layout: &Layout,
        store: &mut store::Client,
        failed: &[String],
        detected: Instant,
    ) -> agent::Result<()> {
        let name = plan_name(failed);
        let Some(plan) = self.table.lookup(failed).cloned() else {
            let _ = cluster::log_event(
                store,
                &Event::now(&cfg.id, format!("no plan for scenario {name}: nothing done (the table does not cover it)")),
            );
            self.failed = failed.to_vec();
            return Ok(());
        };
        let mut current: BTreeMap<String, Desired> = BTreeMap::new();
        for vm in cluster::children(store, cluster::VMS)? {
            if let Some(d) = cluster::read::<Desired>(store, &cluster::desired_path(&vm))? {
                current.insert(vm, d);
            }
        }
        let (desired, deviations) = layout.desired(loaded, &plan.targets, failed, &self.table, self.generation, &current);
        let mut changes: BTreeMap<String, Desired> = BTreeMap::new();
        for (vm, d) in desired {
            let same = current.get(&vm).is_some_and(|c| c.primary == d.primary && c.backup == d.backup);
            if !same {
                changes.insert(vm, d);
            }
        }
        let total = changes.len();
        for d in &deviations {
            let _ = cluster::log_event(store, &Event::now(&cfg.id, format!("plan {name}: DEVIATION: {d}")));
        }
        let mut progress = Progress {
            scenario: name.clone(),
            failed: failed.to_vec(),
            done: 0,
            total,
            generation: self.generation,
            deviations: deviations.clone(),
        };
        cluster::write(store, cluster::PROGRESS, &progress)?;
        let _ = cluster::log_event(
            store,
            &Event::now(
                &cfg.id,
                format!(
                    "plan {name} started {:.1} ms after detection: {} ({} VM(s) to change)",
                    detected.elapsed().as_secs_f64() * 1e3,
                    plan.actions.join("; "),
                    total
                ),
            ),
        );
        for (vm, d) in changes {
            cluster::write(store, &cluster::desired_path(&vm), &d)?;
            progress.done += 1;
            cluster::write(store, cluster::PROGRESS, &progress)?;
            crash_point(&cfg.id, self.generation, progress.done);
        }
        let _ = cluster::log_event(store, &Event::now(&cfg.id, format!("plan {name} written ({} coverage)", plan.coverage)));
        self.failed = failed.to_vec();
        Ok(())
    }
}

/// Every VM's desired record in the store.
fn all_desired(store: &mut store::Client) -> agent::Result<BTreeMap<String, Desired>> {
    let mut all = BTreeMap::new();
    for vm in cluster::children(store, cluster::VMS)? {
        if let Some(x) = cluster::read::<Desired>(store, &cluster::desired_path(&vm))? {
            all.insert(vm, x);
        }
    }
    Ok(all)
}

/// How a pre-copy migration ended, for its event: the destination says whether its source
/// handed the VM over (the source's own record may still say it runs: its agent reports a
/// quarter second later — seen on CI, where the event wrongly said the source had stopped).
fn how_it_moved(source: Option<&agent::cluster::Actual>, dest: Option<&agent::cluster::Actual>) -> &'static str {
    if dest.is_some_and(|d| d.handover_ms.is_some()) || source.is_some_and(|a| a.state == CopyState::Exited) {
        "handed over"
    } else {
        "the source stopped before the handover; the destination took over from its replica"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent::cluster::Actual;

    fn copy(state: CopyState, handover_ms: Option<f64>) -> Actual {
        Actual {
            state,
            pid: 7,
            generation: 1,
            restarts: 0,
            detail: String::new(),
            protected: None,
            replication: None,
            jobs: None,
            handover_ms,
        }
    }

    #[test]
    fn a_handover_is_told_by_the_destination_even_before_the_source_reports_its_exit() {
        let running = copy(CopyState::Running, None);
        let handed = copy(CopyState::Running, Some(5.5));
        assert_eq!(how_it_moved(Some(&running), Some(&handed)), "handed over");
        assert_eq!(how_it_moved(Some(&copy(CopyState::Exited, None)), Some(&running)), "handed over");
        assert!(how_it_moved(Some(&copy(CopyState::Failed, None)), Some(&running)).starts_with("the source stopped"));
        assert!(how_it_moved(None, Some(&running)).starts_with("the source stopped"));
    }
}
