//! The host agent's loop (`vigil agent --host NAME`): holds the host's liveness lease in the
//! store (a heartbeat counter), turns the desired state of the VMs placed on the host into
//! running VMM processes, reports what runs, restarts a crashed VMM per the VM's mode, and
//! re-adopts its VMMs when the agent itself restarts.
//!
//! VMMs run as their own processes (`vigil vm run --spec FILE`, `vigil backup --spec FILE`) in
//! their own session, so an agent that crashes or is upgraded never takes its VMs down. The
//! agent keeps nothing it cannot find again: the specs are in the store, the VMMs' pids in
//! the store's `actual` records and its state directory.
//!
//! Authority: the agent acts only while it holds its host. It stops when the manager fenced
//! the host (`/vigil/hosts/<host>/fence`), and it stops its VMs when it could not renew its
//! heartbeat for half the lease (a host cut off from the cluster must not keep serving what
//! the manager is about to start elsewhere: self-fencing).

use crate::cluster::{self, Actual, AgentRecord, CopyState, Desired, Event, Fence};
use crate::{Error, Result};
use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How an agent runs.
#[derive(Debug, Clone)]
pub struct Config {
    /// The host's name (as in the model).
    pub host: String,
    /// The store's socket.
    pub store: PathBuf,
    /// Spec files, VMM logs and the lock that keeps a second agent out.
    pub state_dir: PathBuf,
    /// The `vigil` executable the VMM processes run.
    pub exe: PathBuf,
    /// Heartbeat period.
    pub period: Duration,
    /// The lease: the manager declares the host failed after this long without a heartbeat.
    pub lease: Duration,
}

/// Which copy of a VM a process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Primary,
    Backup,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Backup => "backup",
        }
    }
}

/// A VMM process of this host.
struct Copy {
    role: Role,
    pid: u32,
    /// Our own child (we can reap it); `None` for a process adopted after a restart.
    child: Option<Child>,
    /// The spec file it runs.
    spec: Vec<u8>,
    generation: u64,
    restarts: u32,
    /// When to try starting it again after a crash.
    retry_at: Option<Instant>,
    state: CopyState,
    detail: String,
    /// A replicated primary stopped while the host fenced itself (by this agent, or by the
    /// previous one's watchdog): its backup holds the VM's replica and takes it over; it is
    /// started here again — afresh, its state lost — only if nothing took it over by
    /// `retry_at` ([`Agent::takeover_grace`]).
    left_to_backup: bool,
}

/// Runs the agent until it is fenced or killed. Returns `Ok` when the manager fenced the host.
pub fn run(cfg: &Config) -> Result<()> {
    std::fs::create_dir_all(&cfg.state_dir).map_err(|e| Error::io("cannot create", &cfg.state_dir, e))?;
    let _lock = lock(&cfg.state_dir.join("agent.lock"), &cfg.host)?;
    // From here on the host's VMs are stopped half a lease after the last renewal, whatever
    // this thread is doing (blocked in the store, or not yet connected to it).
    let watchdog = Watchdog::start(cfg);
    let mut store = store::Client::connect(&cfg.store)?;
    store.set_retry_for(cfg.lease / 2);
    store.set_request_timeout(cfg.lease / 2);
    // The host's lease first, before anything else a new agent does (the previous agent's
    // VMs run on, and the watchdog counts from its last renewal).
    let renewal_ns = monotonic_ns();
    let beat = cluster::read_counter(&mut store, &cluster::heartbeat_path(&cfg.host))?.unwrap_or(0) + 1;
    store.write(&cluster::heartbeat_path(&cfg.host), beat.to_string().as_bytes())?;
    watchdog.renewed(renewal_ns);
    // From here on a thread of its own renews the lease, on a connection of its own: a slow
    // store call of this loop (a reply waiting for the store's disk) never delays a renewal.
    let beat = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(beat));
    let _renewer = Renewer::start(cfg, std::sync::Arc::clone(&beat), watchdog.clone())?;
    let incarnation = crate::protection::random_id();
    cluster::write(&mut store, &cluster::agent_path(&cfg.host), &AgentRecord { pid: std::process::id(), incarnation })?;
    // A fence left from before the host started (in this boot) belongs to an earlier failure
    // of the host: only a fence written since stops us — also when it was written while an
    // earlier agent of this boot held the host (a respawned agent continues its life).
    let fence_now = cluster::read::<Fence>(&mut store, &cluster::fence_path(&cfg.host))?.map(|f| f.generation);
    let fenced_before = fence_baseline(&cfg.state_dir, fence_now);
    let mut agent = Agent {
        cfg: cfg.clone(),
        copies: BTreeMap::new(),
        beat,
        watchdog: watchdog.clone(),
        fenced_before,
        waiting: BTreeMap::new(),
        monitor: crate::monitor::Monitor::start(),
        migrations: BTreeMap::new(),
        policy_asked: BTreeMap::new(),
        protection_asked: BTreeMap::new(),
        self_fenced: BTreeMap::new(),
    };
    agent.adopt(&mut store)?;
    let _ = cluster::log_event(&mut store, &Event::now(&cfg.host, format!("agent started (pid {})", std::process::id())));
    tracing::info!("agent {}: holding the host; {} VMM(s) adopted", cfg.host, agent.copies.len());
    loop {
        let t0 = Instant::now();
        // The respawner's heartbeat (sent by the renewer): a hung agent — this loop stuck, or
        // the whole process stopped — is killed and replaced.
        watchdog.looped();
        if watchdog.take_fired() {
            // The watchdog stopped the host's VMs while this loop could not renew: account
            // for them as self-fenced.
            agent.self_fence("the watchdog stopped them: the lease was not renewed for half of it");
        }
        match agent.step(&mut store) {
            Ok(Step::Go) => {}
            Ok(Step::Fenced(generation)) => {
                agent.stop_all("the manager fenced the host");
                let _ = cluster::log_event(
                    &mut store,
                    &Event::now(&cfg.host, format!("agent stopped: host fenced at generation {generation}")),
                );
                return Ok(());
            }
            Err(e) => {
                tracing::warn!("agent {}: {e}", cfg.host);
                // The lease could not be renewed: once half of it has gone by since the last
                // renewal, the manager may soon declare the host failed and start its VMs
                // elsewhere; stop them first.
                if agent.watchdog.since_renewal() > cfg.lease / 2 && !agent.copies.is_empty() {
                    agent.self_fence("cannot renew the host's lease: self-fencing");
                }
            }
        }
        std::thread::sleep(cfg.period.saturating_sub(t0.elapsed()));
    }
}

/// The fence this host had when its first agent of this boot started (kept in
/// `<state>/agent.fence-baseline` with the kernel's boot id): a later agent of the same boot
/// compares the fence with that, not with what it finds, so a fence written while an earlier
/// agent held the host stops it too. A new boot (the host restarted after its failure) takes
/// the fence it finds as the baseline: the host may rejoin. Without a boot id, what it finds.
fn fence_baseline(state_dir: &Path, fence_now: Option<u64>) -> Option<u64> {
    #[derive(serde::Serialize, serde::Deserialize)]
    struct Baseline {
        boot: String,
        fenced_before: Option<u64>,
    }
    let Ok(boot) = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").map(|b| b.trim().to_string()) else {
        return fence_now;
    };
    let path = state_dir.join("agent.fence-baseline");
    let kept = std::fs::read(&path).ok().and_then(|b| serde_json::from_slice::<Baseline>(&b).ok());
    if let Some(b) = kept.filter(|b| b.boot == boot) {
        return b.fenced_before;
    }
    if let Ok(text) = serde_json::to_vec(&Baseline { boot, fenced_before: fence_now }) {
        let _ = crate::replace_file(&path, &text);
    }
    fence_now
}

/// Why the agent starts a copy (the event log says it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Start {
    /// Wanted here and never run here in this assignment.
    Fresh,
    /// Its process crashed (restarted with backoff).
    AfterCrash,
    /// This agent stopped it while self-fencing; the host was never declared failed.
    AfterSelfFencing,
    /// A voted primary whose voter stopped with the agent before this one (or by that
    /// agent's fencing watchdog), in the assignment still in force ([`Agent::assignment_file`]).
    AfterAgentRestart,
    /// Mode 4: the voted group's backup here becomes its primary, from the replica.
    TakeOver,
    /// Its role here changed.
    NewRole,
    /// A backup whose spec changed.
    NewSpec,
}

impl Start {
    fn what(self) -> &'static str {
        match self {
            Start::Fresh => "started",
            Start::AfterCrash => "restarted after a crash",
            Start::AfterSelfFencing => "restarted after self-fencing",
            Start::AfterAgentRestart => "restarted after its agent's restart",
            Start::TakeOver => "took over from its replica",
            Start::NewRole => "restarted in its new role",
            Start::NewSpec => "restarted with a new spec",
        }
    }

    /// The VM continues where its last copy here stopped (a voted primary from its local
    /// replica), not afresh from the desired record's spec.
    fn continues(self) -> bool {
        matches!(self, Start::AfterCrash | Start::AfterSelfFencing | Start::AfterAgentRestart)
    }
}

/// The replica a voted primary's voter was started from (`local.resume`).
fn resumed(spec: &[u8]) -> Option<PathBuf> {
    serde_json::from_slice::<crate::VmSpec>(spec).ok()?.local?.resume
}

/// A voted primary's spec with its voter resuming the replica in `dir` (none: afresh); any
/// other spec as it is.
fn resuming(spec: Vec<u8>, dir: Option<PathBuf>) -> Vec<u8> {
    serde_json::from_slice::<crate::VmSpec>(&spec)
        .ok()
        .and_then(|mut s| {
            s.local.as_mut()?.resume = dir;
            serde_json::to_vec_pretty(&s).ok()
        })
        .unwrap_or(spec)
}

/// Whether a primary's spec is a voted VM's.
fn voted_primary(spec: &[u8]) -> bool {
    serde_json::from_slice::<crate::VmSpec>(spec).ok().is_some_and(|s| s.local.is_some())
}

/// Whether a primary's spec is a replicated VM's (remote-backup mode, one instance).
fn replicated_primary(spec: &[u8]) -> bool {
    serde_json::from_slice::<crate::VmSpec>(spec).ok().is_some_and(|s| s.local.is_none() && s.protection.is_some())
}

/// Whether a backup's spec is a voted group's (mode 4).
fn voted_backup(spec: &[u8]) -> bool {
    serde_json::from_slice::<crate::vm::BackupSpec>(spec).ok().is_some_and(|s| s.local.is_some())
}

enum Step {
    Go,
    Fenced(u64),
}

struct Agent {
    cfg: Config,
    copies: BTreeMap<String, Copy>,
    /// The heartbeat counter last written (by the [`Renewer`] or by [`Agent::fresh`]).
    beat: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Stops the host's VMs on its own when renewals stop ([`Watchdog`]).
    watchdog: Watchdog,
    fenced_before: Option<u64>,
    /// VMs migrating here, waiting for their source's snapshot since.
    waiting: BTreeMap<String, Instant>,
    /// Reads the running VMs' job marks.
    monitor: crate::monitor::Monitor,
    /// Pre-copy migrations away from this host, as far as this agent asked.
    migrations: BTreeMap<String, Asked>,
    /// The checkpoint policy last asked of each VM's driver, and when.
    policy_asked: BTreeMap<String, (String, Instant)>,
    /// The backup each running primary was last asked to protect its VM to, and when.
    protection_asked: BTreeMap<String, (String, Instant)>,
    /// Voted primaries this agent stopped while self-fencing (the host kept, never declared
    /// failed): such a VM continues its instances' state from its local replica when it starts
    /// here again, as after a crash of its voter.
    /// (With the replica its voter resumed, if any.)
    self_fenced: BTreeMap<String, Option<PathBuf>>,
}

/// What an agent asked of a VM migrating away.
#[derive(Default)]
struct Asked {
    asked: Option<Instant>,
    started: bool,
    /// When this agent first saw the destination hold a replica.
    protected_since: Option<Instant>,
    handover_asked: Option<Instant>,
}

/// How long a migrating VM stays protected to its destination before the handover: none,
/// unless `VIGIL_HANDOVER_DELAY_MS` says (tests kill the source in that window).
fn handover_delay() -> Duration {
    std::env::var("VIGIL_HANDOVER_DELAY_MS").ok().and_then(|v| v.parse().ok()).map_or(Duration::ZERO, Duration::from_millis)
}

impl Agent {
    /// Before acting: the agent may act only within half a lease of its last renewal (so the
    /// manager cannot have declared the host failed); renew here first if a quarter has run
    /// out (the [`Renewer`] is late).
    fn fresh(&mut self, store: &mut store::Client) -> Result<()> {
        if self.watchdog.since_renewal() >= self.cfg.lease / 4 {
            renew(&self.cfg, store, &self.beat, &self.watchdog)?;
        }
        Ok(())
    }

    fn step(&mut self, store: &mut store::Client) -> Result<Step> {
        if let Some(f) = cluster::read::<Fence>(store, &cluster::fence_path(&self.cfg.host))? {
            if Some(f.generation) != self.fenced_before {
                return Ok(Step::Fenced(f.generation));
            }
        }
        self.reap();
        self.reconcile(store)?;
        Ok(Step::Go)
    }

    /// Notices VMMs that ended.
    fn reap(&mut self) {
        for (vm, c) in self.copies.iter_mut() {
            if !matches!(c.state, CopyState::Running | CopyState::Backup) {
                continue;
            }
            let ended = match c.child.as_mut() {
                Some(child) => match child.try_wait() {
                    Ok(Some(st)) => Some(st.code().map_or_else(|| format!("killed by {st}"), |s| format!("exit status {s}"))),
                    Ok(None) => None,
                    Err(e) => Some(format!("cannot wait: {e}")),
                },
                None => (!alive(c.pid)).then(|| "ended (adopted, status unknown)".to_string()),
            };
            if let Some(how) = ended {
                let clean = how == "exit status 0";
                tracing::warn!("agent {}: {} of {vm} (pid {}) {how}", self.cfg.host, c.role.name(), c.pid);
                c.state = if clean { CopyState::Exited } else { CopyState::Failed };
                c.detail = how;
                c.child = None;
                c.retry_at = Some(Instant::now() + backoff(c.restarts));
            }
        }
    }

    fn reconcile(&mut self, store: &mut store::Client) -> Result<()> {
        let host = self.cfg.host.clone();
        let mut wanted: BTreeMap<String, (Role, Vec<u8>, u64, bool)> = BTreeMap::new();
        let mut moving_out: BTreeMap<String, (String, PathBuf)> = BTreeMap::new();
        let mut moving_in: BTreeMap<String, cluster::MigrateFrom> = BTreeMap::new();
        let mut precopy: BTreeMap<String, cluster::MigrateTo> = BTreeMap::new();
        // The checkpoint policy each replicated VM here should run (its primary's, or what its
        // backup runs after a takeover).
        let mut policies: BTreeMap<String, replication::PolicySpec> = BTreeMap::new();
        // The backup each replicated VM's primary here should protect it to.
        let mut protections: BTreeMap<String, crate::vm::Protection> = BTreeMap::new();
        for vm in cluster::children(store, cluster::VMS)? {
            let Some(d) = cluster::read::<Desired>(store, &cluster::desired_path(&vm))? else { continue };
            if let Some(p) = d.primary.as_ref().filter(|p| p.host == host) {
                let spec = serde_json::to_vec_pretty(&p.spec).map_err(|e| Error::Cluster(e.to_string()))?;
                wanted.insert(vm.clone(), (Role::Primary, spec, d.generation, p.restart));
                if let Some(pr) = &p.spec.protection {
                    policies.insert(vm.clone(), pr.policy);
                    if p.migrate_to.is_none() {
                        protections.insert(vm.clone(), pr.clone());
                    }
                }
                if let Some(m) = &p.migrate_to {
                    precopy.insert(vm.clone(), m.clone());
                }
                if let Some(m) = &p.migrate_from {
                    moving_in.insert(vm, m.clone());
                }
            } else if let Some(b) = d.backup.as_ref().filter(|b| b.host == host) {
                let spec = serde_json::to_vec_pretty(&b.spec).map_err(|e| Error::Cluster(e.to_string()))?;
                policies.insert(vm.clone(), b.spec.then_policy);
                wanted.insert(vm, (Role::Backup, spec, d.generation, false));
            } else if let Some(p) = d.primary.as_ref() {
                if let Some(m) = p.migrate_from.as_ref().filter(|m| m.host == host) {
                    moving_out.insert(vm, (p.host.clone(), m.dir.clone()));
                }
            }
        }
        // A self-fenced primary's local replica is the VM's state only while the VM stays
        // wanted here as primary.
        self.self_fenced.retain(|vm, _| wanted.get(vm).is_some_and(|w| w.0 == Role::Primary));
        // A voted backup's replica is a takeover's only while the VM stays placed here (its
        // backup, or the primary taking it over): an assignment that ended while no agent here
        // stopped the receiver on purpose (it was gone with an earlier agent) ends now.
        if let Ok(entries) = std::fs::read_dir(&self.cfg.state_dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.strip_suffix(".backup.assignment").is_some_and(|vm| !wanted.contains_key(vm)) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        // Stop what is no longer wanted here; a VM migrating away is snapshotted first.
        let unwanted: Vec<String> = self.copies.keys().filter(|vm| !wanted.contains_key(*vm)).cloned().collect();
        for vm in unwanted {
            if let Some(mut c) = self.copies.remove(&vm) {
                if let (Some((to, dir)), Role::Primary, CopyState::Running) = (moving_out.get(&vm), c.role, c.state) {
                    match self.migrate_out(store, &vm, &mut c, dir) {
                        Ok(m) => {
                            let what = format!("{vm}: migrating to {to}: paused and snapshotted in {:.1} ms", m.snapshot_ms);
                            tracing::info!("agent {host}: {what}");
                            let _ = cluster::log_event(store, &Event::now(&host, what));
                        }
                        Err(e) => {
                            tracing::error!("agent {host}: {vm}: migration to {to} failed: {e}");
                            let _ = cluster::log_event(store, &Event::now(&host, format!("{vm}: migration to {to} failed: {e}")));
                        }
                    }
                }
                stop(&mut c);
                if c.role == Role::Primary {
                    let _ = std::fs::remove_file(self.assignment_file(&vm));
                } else {
                    // Stopped on purpose (the backup moves): its replica is no takeover's.
                    let _ = std::fs::remove_file(self.backup_assignment_file(&vm));
                }
                tracing::info!("agent {host}: stopped the {} of {vm}", c.role.name());
                let _ = store.rm(&cluster::actual_path(&vm, &host));
                let _ = cluster::log_event(store, &Event::now(&host, format!("stopped the {} of {vm}", c.role.name())));
            }
        }
        for (vm, (role, mut spec, generation, restart)) in wanted {
            // A VM migrating here starts from its source's snapshot once it is written, or
            // afresh if the source is gone (fenced) or never delivers.
            if let (Some(m), None) = (moving_in.get(&vm), self.copies.get(&vm)) {
                let ready = cluster::read::<cluster::Migration>(store, &cluster::migration_path(&vm))?.is_some_and(|r| r.dir == m.dir);
                let since = *self.waiting.entry(vm.clone()).or_insert_with(Instant::now);
                let source_fenced = cluster::read::<Fence>(store, &cluster::fence_path(&m.host))?.is_some();
                if !ready {
                    if !(source_fenced || since.elapsed() > MIGRATION_WAIT) {
                        continue;
                    }
                    spec = fresh_spec(&spec);
                    let _ =
                        cluster::log_event(store, &Event::now(&host, format!("{vm}: no snapshot from {} (gone): starting afresh", m.host)));
                }
            }
            self.waiting.remove(&vm);
            let changed = self
                .copies
                .get(&vm)
                .is_some_and(|c| c.spec != spec && self.localised(&vm, role, &c.spec) != self.localised(&vm, role, &spec));
            let took_over_now = self.copies.get(&vm).is_some_and(|c| self.took_over(&vm, c));
            let assignment = self.assignment_file(&vm);
            // (Read only for a copy not running here: every period otherwise.)
            let same_assignment = !self.copies.contains_key(&vm)
                && std::fs::read_to_string(&assignment).ok().and_then(|s| s.trim().parse().ok()) == Some(generation);
            let backup_held = !self.copies.contains_key(&vm) && self.backup_replica_held(&vm);
            let replica_dir = self.replica_dir(&vm);
            let action = match self.copies.get_mut(&vm) {
                None if role == Role::Primary && self.self_fenced.contains_key(&vm) => Some(Start::AfterSelfFencing),
                // Its voter stopped with the agent before this one (or by that agent's fencing
                // watchdog), in the assignment still in force: nothing ran it elsewhere since.
                None if role == Role::Primary && voted_primary(&spec) && same_assignment => Some(Start::AfterAgentRestart),
                // Mode 4: the plan makes the voted group's backup here its primary, but its
                // receiver is gone with the agent before this one (that agent's fencing watchdog
                // stops it): the replica it left holds every request a reply was released for
                // (`vigil local` still refuses one its primary went on without). It started
                // the VM afresh, losing them (`mode_4_a_backups_agent_that_dies_at_the_takeover…`).
                None if role == Role::Primary && voted_primary(&spec) && backup_held => {
                    spec = resuming(spec, Some(replica_dir.clone()));
                    Some(Start::TakeOver)
                }
                // A replicated primary that ran here under this assignment and is gone (the
                // previous agent's watchdog stopped it): its backup holds the VM.
                None if role == Role::Primary && replicated_primary(&spec) && same_assignment => {
                    self.leave_to_backup(&vm, spec.clone(), generation, 0);
                    let what = format!("{vm}: its primary stopped with the previous agent: left to its backup to take over");
                    tracing::warn!("agent {host}: {what}");
                    let _ = cluster::log_event(store, &Event::now(&host, what));
                    None
                }
                None => Some(Start::Fresh),
                Some(c) if c.role == Role::Backup && role == Role::Primary && voted_backup(&c.spec) => {
                    // Mode 4: the voted group's backup holds a replica (a snapshot and the request
                    // log); the VM's voter starts here from it. Its receiver must have stopped
                    // writing first.
                    crash_on_takeover(&self.cfg.state_dir, &host, &vm, c);
                    stop(c);
                    spec = resuming(spec, Some(replica_dir.clone()));
                    Some(Start::TakeOver)
                }
                Some(c) if c.role == Role::Backup && role == Role::Primary && matches!(c.state, CopyState::Running | CopyState::Backup) => {
                    // The backup took over (or is about to): the same process runs the VM now.
                    c.role = Role::Primary;
                    c.generation = generation;
                    c.state = CopyState::Running;
                    c.spec = spec.clone();
                    if replicated_primary(&spec) {
                        let _ = crate::replace_file(&assignment, generation.to_string().as_bytes());
                    }
                    // A planned handover (pre-copy migration) says how long the VM stopped.
                    let handover =
                        crate::protection::primary::ReplicationState::load(&self.cfg.state_dir.join(format!("{vm}.replication.json")))
                            .and_then(|s| s.handover_ms)
                            .map(|ms| format!(": handed over by its source, the VM stopped for {ms:.1} ms"))
                            .unwrap_or_default();
                    let _ = cluster::log_event(
                        store,
                        &Event::now(&host, format!("{vm}: the backup runs the VM now (pid {}){handover}", c.pid)),
                    );
                    None
                }
                Some(c) if c.role != role => {
                    stop(c);
                    Some(Start::NewRole)
                }
                Some(c) if c.role == Role::Backup && changed && c.state == CopyState::Backup && only_after_takeover(&c.spec, &spec) => {
                    // Only what it does after a takeover changed — the policy (the manager
                    // adapted the VM's checkpoint interval) or where it protects the VM then (a
                    // plan for another host moved its next backup): no new synchronisation for
                    // that; a backup that takes over is given both then
                    // ([`Agent::apply_policies`], [`Agent::apply_protections`]).
                    c.spec = spec.clone();
                    None
                }
                // A backup that has just taken the VM over runs it: never stopped for a new
                // spec (that killed the only running copy — the primary was fenced by the
                // takeover — seen on a loaded CI machine); the manager moves the VM to it.
                Some(c) if c.role == Role::Backup && changed && took_over_now => None,
                // (A copy adopted after the agent's restart has the spec its file holds,
                // localised: compared as this host runs it, or an unchanged backup would be
                // restarted, voiding its replica.)
                Some(c) if c.role == Role::Backup && changed && c.state == CopyState::Backup => {
                    // Where it listens or what it does after a takeover changed: start over
                    // (the primary synchronises it again).
                    stop(c);
                    Some(Start::NewSpec)
                }
                Some(c) if matches!(c.state, CopyState::Running | CopyState::Backup) => {
                    if generation > c.generation && c.role == Role::Primary && (voted_primary(&c.spec) || replicated_primary(&c.spec)) {
                        let _ = crate::replace_file(&assignment, generation.to_string().as_bytes());
                    }
                    c.generation = c.generation.max(generation);
                    None
                }
                Some(c) if c.left_to_backup && c.role == role => {
                    if c.retry_at.is_some_and(|t| Instant::now() < t) {
                        None
                    } else {
                        let what = format!(
                            "{vm}: nothing took it over within {} s of its stop: starting it afresh",
                            self.takeover_grace().as_secs()
                        );
                        tracing::warn!("agent {host}: {what}");
                        let _ = cluster::log_event(store, &Event::now(&host, what));
                        Some(Start::Fresh)
                    }
                }
                Some(c) if c.state == CopyState::Failed && (restart || c.role == Role::Backup) => {
                    if c.retry_at.is_some_and(|t| Instant::now() < t) {
                        None
                    } else {
                        Some(Start::AfterCrash)
                    }
                }
                Some(_) => None,
            };
            if let Some(why) = action {
                self.fresh(store)?;
                if why.continues() {
                    spec = fresh_spec(&spec);
                    // A voted VM's voter continues its instances' state from its local replica
                    // (after self-fencing too: the host was never declared failed, so nothing
                    // ran the VM elsewhere, and a fresh start would lose acknowledged requests,
                    // the backup's replica included, which the new voter's session voids).
                    if role == Role::Primary {
                        let mut replica = self.spec_file(&vm, role).into_os_string();
                        replica.push(".local/replica");
                        // (`replica.old`: the one the last voter resumed, when it ended before
                        // it had its own; `vigil local` takes that one then.)
                        let held = |r: &Path| r.join("current").is_file() || r.with_file_name("replica.old").join("current").is_file();
                        // Without a local one, the replica the last voter resumed (the backup's,
                        // after a takeover): it ended before it had its own, serving nothing.
                        let replica = PathBuf::from(&replica);
                        // (After an agent's restart: as the spec file the last agent wrote says.)
                        let last = self
                            .copies
                            .get(&vm)
                            .and_then(|c| resumed(&c.spec))
                            .or(self.self_fenced.get(&vm).cloned().flatten())
                            .or_else(|| std::fs::read(self.spec_file(&vm, role)).ok().and_then(|s| resumed(&s)));
                        let resume = if held(&replica) { Some(replica) } else { last.filter(|r| r.join("current").is_file()) };
                        spec = resuming(spec, resume);
                    }
                }
                self.self_fenced.remove(&vm);
                let restarts = self.copies.get(&vm).map_or(0, |c| c.restarts + u32::from(why == Start::AfterCrash));
                // A migration's snapshot is restored once: the VM ran on from it, so starting
                // it again later (after a crash, or after this agent stopped it to fence
                // itself) from that snapshot would bring back an older state under the same
                // connections. It starts afresh instead, as any unreplicated VM does.
                let restore = (role == Role::Primary).then(|| serde_json::from_slice::<crate::VmSpec>(&spec).ok()?.restore).flatten();
                if let Some(r) = &restore {
                    if std::fs::read(self.restored_file(&vm)).is_ok_and(|b| b == r.as_os_str().as_encoded_bytes()) {
                        spec = fresh_spec(&spec);
                        let what = format!(
                            "{vm}: its migration snapshot was restored before and is older than the state it ran with: starting afresh"
                        );
                        tracing::info!("agent {host}: {what}");
                        let _ = cluster::log_event(store, &Event::now(&host, what));
                    }
                }
                match self.spawn(&vm, role, &spec) {
                    Ok((child, pid)) => {
                        if role == Role::Primary && (voted_primary(&spec) || replicated_primary(&spec)) {
                            let _ = crate::replace_file(&self.assignment_file(&vm), generation.to_string().as_bytes());
                        }
                        // A voted group's receiver runs here (its replica a takeover's until the
                        // backup is stopped on purpose); a primary here has taken it over.
                        if role == Role::Backup && voted_backup(&spec) {
                            let _ = crate::replace_file(&self.backup_assignment_file(&vm), generation.to_string().as_bytes());
                        } else if role == Role::Primary {
                            let _ = std::fs::remove_file(self.backup_assignment_file(&vm));
                        }
                        crash_after_spawn(&self.cfg.state_dir, &host, &vm);
                        if let Some(r) =
                            restore.filter(|_| serde_json::from_slice::<crate::VmSpec>(&spec).is_ok_and(|s| s.restore.is_some()))
                        {
                            let _ = crate::replace_file(&self.restored_file(&vm), r.as_os_str().as_encoded_bytes());
                        }
                        let state = if role == Role::Primary { CopyState::Running } else { CopyState::Backup };
                        let why = why.what();
                        tracing::info!("agent {host}: {why} the {} of {vm} (pid {pid})", role.name());
                        let _ = cluster::log_event(store, &Event::now(&host, format!("{why} the {} of {vm} (pid {pid})", role.name())));
                        self.copies.insert(
                            vm.clone(),
                            Copy {
                                role,
                                pid,
                                child: Some(child),
                                spec,
                                generation,
                                restarts,
                                retry_at: None,
                                state,
                                detail: String::new(),
                                left_to_backup: false,
                            },
                        );
                    }
                    Err(e) => {
                        tracing::error!("agent {host}: cannot start the {} of {vm}: {e}", role.name());
                        self.copies.insert(
                            vm.clone(),
                            Copy {
                                role,
                                pid: 0,
                                child: None,
                                spec,
                                generation,
                                restarts,
                                retry_at: Some(Instant::now() + backoff(restarts)),
                                state: CopyState::Failed,
                                detail: e.to_string(),
                                left_to_backup: false,
                            },
                        );
                    }
                }
            }
            if let Some(c) = self.copies.get(&vm) {
                let state = self.reported_state(&vm, c);
                let replication = (state == CopyState::Running && c.role == Role::Primary || self.took_over(&vm, c))
                    .then(|| crate::protection::primary::ReplicationState::load(&self.state_file(&vm)))
                    .flatten();
                let protected = replication.as_ref().map(|s| s.protected);
                let handover_ms = replication.as_ref().and_then(|s| s.handover_ms);
                let replication = replication.and_then(|s| s.figures);
                let jobs = (state == CopyState::Running).then(|| self.monitor.figures(&vm)).flatten();
                let actual = Actual {
                    state,
                    pid: c.pid,
                    generation: c.generation,
                    restarts: c.restarts,
                    detail: c.detail.clone(),
                    protected,
                    replication,
                    jobs,
                    handover_ms,
                };
                let path = cluster::actual_path(&vm, &host);
                if cluster::read::<Actual>(store, &path)?.as_ref() != Some(&actual) {
                    cluster::write(store, &path, &actual)?;
                }
            }
        }
        self.apply_policies(store, &policies);
        self.apply_protections(store, &protections);
        // VMs migrating away by pre-copy: protected to the destination, then handed over.
        for (vm, m) in precopy {
            self.migrate_step(store, &vm, &m);
        }
        self.migrations.retain(|vm, _| self.copies.get(vm).is_some_and(|c| c.state == CopyState::Running));
        // Job monitoring follows the running copies (a backup that took over included).
        let watched = self
            .copies
            .iter()
            .filter(|(vm, c)| self.reported_state(vm, c) == CopyState::Running)
            .filter_map(|(vm, c)| {
                let spec: serde_json::Value = serde_json::from_slice(&c.spec).ok()?;
                Some((vm.clone(), PathBuf::from(spec.get("api")?.as_str()?)))
            })
            .collect();
        self.monitor.watch(watched);
        Ok(())
    }

    /// Switches the checkpoint policy of each running replicated VM whose driver runs another
    /// one than `policies` says (the manager adapted its interval; or a backup took over with
    /// the policy it was started with) through the socket beside its control socket
    /// ([`crate::migration::Request::Policy`]): the protection goes on, nothing is
    /// synchronised again. Asked again at most once a second until the driver reports it.
    fn apply_policies(&mut self, store: &mut store::Client, policies: &BTreeMap<String, replication::PolicySpec>) {
        let host = self.cfg.host.clone();
        for (vm, want) in policies {
            let Some(c) = self.copies.get(vm) else { continue };
            if self.reported_state(vm, c) != CopyState::Running {
                continue;
            }
            let Some(state) = crate::protection::primary::ReplicationState::load(&self.state_file(vm)) else { continue };
            let Some(runs) = state.policy else { continue };
            let want = want.to_string();
            if runs == want {
                self.policy_asked.remove(vm);
                continue;
            }
            if self.policy_asked.get(vm).is_some_and(|(p, t)| *p == want && t.elapsed() < Duration::from_secs(1)) {
                continue;
            }
            self.policy_asked.insert(vm.clone(), (want.clone(), Instant::now()));
            let Some(api) =
                serde_json::from_slice::<serde_json::Value>(&c.spec).ok().and_then(|s| Some(PathBuf::from(s.get("api")?.as_str()?)))
            else {
                continue;
            };
            let pid = c.pid;
            match crate::migration::call(&crate::migration::socket_path(&api), &crate::migration::Request::Policy { policy: want.clone() })
            {
                Ok(_) => {
                    let what =
                        format!("{vm}: checkpoint policy {runs} → {want} on the running copy (pid {pid}), without a new synchronisation");
                    tracing::info!("agent {host}: {what}");
                    let _ = cluster::log_event(store, &Event::now(&host, what));
                }
                Err(e) => tracing::warn!("agent {host}: {vm}: cannot switch its checkpoint policy to {want}: {e}"),
            }
        }
    }

    /// Running primaries that protect their VM to another backup than the desired record
    /// says — a copy that took over with the backup its spec named when it started, or whose
    /// backup's host failed and the plan gave it a new one — are asked to protect it to the
    /// desired backup (a new synchronisation; the old backup is deregistered from the lease).
    /// The driver reports where it protects to in its replication state.
    fn apply_protections(&mut self, store: &mut store::Client, protections: &BTreeMap<String, crate::vm::Protection>) {
        let host = self.cfg.host.clone();
        for (vm, want) in protections {
            let Some(c) = self.copies.get(vm) else { continue };
            if c.role != Role::Primary || self.reported_state(vm, c) != CopyState::Running {
                continue;
            }
            let Some(runs) = crate::protection::primary::ReplicationState::load(&self.state_file(vm)).and_then(|s| s.backup) else {
                continue;
            };
            if runs == want.backup {
                self.protection_asked.remove(vm);
                continue;
            }
            if self.protection_asked.get(vm).is_some_and(|(b, t)| *b == want.backup && t.elapsed() < Duration::from_secs(1)) {
                continue;
            }
            self.protection_asked.insert(vm.clone(), (want.backup.clone(), Instant::now()));
            let Some(api) = serde_json::from_slice::<crate::VmSpec>(&c.spec).ok().and_then(|s| s.api) else { continue };
            let mut p = want.clone();
            p.state_file = Some(self.state_file(vm));
            p.arbiter = self.lease_service(&p.arbiter);
            match crate::migration::call(&crate::migration::socket_path(&api), &crate::migration::Request::Protect(Box::new(p))) {
                Ok(detail) => {
                    let what = format!("{vm}: protected to its backup at {} now, not {runs} ({detail})", want.backup);
                    tracing::info!("agent {host}: {what}");
                    let _ = cluster::log_event(store, &Event::now(&host, what));
                }
                Err(e) => tracing::warn!("agent {host}: {vm}: cannot give it its backup at {}: {e}", want.backup),
            }
        }
    }

    /// A backup copy whose process took the VM over: its replication driver (the primary's,
    /// since the takeover) has written the VM's replication state, which no backup writes
    /// (the file is removed whenever a copy is started here).
    fn took_over(&self, vm: &str, c: &Copy) -> bool {
        c.role == Role::Backup && c.state == CopyState::Backup && self.state_file(vm).exists()
    }

    /// What the copy is doing, as the cluster should see it: a backup that took over runs the
    /// VM (so the manager can adopt the takeover; `manager::daemon`).
    fn reported_state(&self, vm: &str, c: &Copy) -> CopyState {
        if self.took_over(vm, c) {
            CopyState::Running
        } else if c.role == Role::Primary && c.state == CopyState::Running && !self.voter_serves(vm, c) {
            CopyState::Starting
        } else {
            c.state
        }
    }

    /// A voted VM's voter serves once it has opened the VM's address (its `local.json`);
    /// any other copy serves while it runs.
    fn voter_serves(&self, vm: &str, c: &Copy) -> bool {
        if serde_json::from_slice::<crate::VmSpec>(&c.spec).ok().is_none_or(|s| s.local.is_none()) {
            return true;
        }
        let mut state = self.spec_file(vm, Role::Primary).into_os_string();
        state.push(".local/local.json");
        std::fs::read(PathBuf::from(state))
            .ok()
            .and_then(|b| serde_json::from_slice::<crate::voter::driver::GroupState>(&b).ok())
            .is_some_and(|g| g.serving && g.voter_pid == c.pid)
    }

    /// Where a voted group's backup keeps its replica (`vigil local --receive --spec FILE`
    /// keeps it in `FILE.local`).
    fn replica_dir(&self, vm: &str) -> PathBuf {
        let mut p = self.spec_file(vm, Role::Backup).into_os_string();
        p.push(".local");
        p.into()
    }

    /// Which migration snapshot this host restored `vm` from last (that one is never restored
    /// again).
    fn restored_file(&self, vm: &str) -> PathBuf {
        self.cfg.state_dir.join(format!("{vm}.restored"))
    }

    /// The generation of the desired record under which this host last started (or kept) a
    /// voted VM's primary. A new agent that finds no voter to adopt (it died with the agent
    /// before, or that agent's fencing watchdog stopped it) continues the VM from its local
    /// replica when the record in force is still that one: the VM was never placed elsewhere
    /// since (a move writes a new generation), so the replica is its newest state.
    fn assignment_file(&self, vm: &str) -> PathBuf {
        self.cfg.state_dir.join(format!("{vm}.primary.assignment"))
    }

    /// Written when this host starts a voted group's backup (its receiver), removed when the
    /// backup is stopped on purpose or a primary of the VM starts here: while it exists, the
    /// replica in [`Agent::replica_dir`] is what a takeover here starts from, even when the
    /// receiver is gone with an earlier agent.
    fn backup_assignment_file(&self, vm: &str) -> PathBuf {
        self.cfg.state_dir.join(format!("{vm}.backup.assignment"))
    }

    /// Whether a voted group's backup ran here, was never stopped on purpose, and left a
    /// replica (a complete snapshot: its `current`).
    fn backup_replica_held(&self, vm: &str) -> bool {
        self.backup_assignment_file(vm).is_file() && self.replica_dir(vm).join("current").is_file()
    }

    fn spec_file(&self, vm: &str, role: Role) -> PathBuf {
        self.cfg.state_dir.join(format!("{vm}.{}.json", role.name()))
    }

    /// Where a VM's replication state is kept on this host (whichever process runs it).
    fn state_file(&self, vm: &str) -> PathBuf {
        self.cfg.state_dir.join(format!("{vm}.replication.json"))
    }

    /// The spec as this host runs it: with its local replication state file (removed: the
    /// copy about to start writes it anew).
    fn localise(&self, vm: &str, role: Role, spec: &[u8]) -> Vec<u8> {
        let _ = std::fs::remove_file(self.state_file(vm));
        self.localised(vm, role, spec)
    }

    /// `spec` as this host's copy runs it (the same for a spec already localised).
    fn localised(&self, vm: &str, role: Role, spec: &[u8]) -> Vec<u8> {
        let file = Some(self.state_file(vm));
        let out = match role {
            Role::Primary => serde_json::from_slice::<crate::VmSpec>(spec).ok().map(|mut s| {
                if let Some(p) = s.protection.as_mut() {
                    p.state_file = file;
                    p.arbiter = self.lease_service(&p.arbiter);
                }
                s.disk = s.disk.map(|d| self.disk_path(&d));
                serde_json::to_vec_pretty(&s)
            }),
            Role::Backup => serde_json::from_slice::<crate::vm::BackupSpec>(spec).ok().map(|mut s| {
                s.state_file = file;
                s.arbiter = self.lease_service(&s.arbiter);
                s.disk = s.disk.map(|d| self.disk_path(&d));
                serde_json::to_vec_pretty(&s)
            }),
        };
        out.and_then(Result::ok).unwrap_or_else(|| spec.to_vec())
    }

    /// Where this host keeps a disk a spec names: a relative path is in the state directory
    /// (each host its own copy of the VM's disk).
    fn disk_path(&self, disk: &Path) -> PathBuf {
        if disk.is_relative() {
            self.cfg.state_dir.join(disk)
        } else {
            disk.to_path_buf()
        }
    }

    /// The lease service as this host's copies ask it: `store` (the cluster's lease records)
    /// is this agent's own store front end.
    fn lease_service(&self, service: &str) -> String {
        lease_service(&self.cfg.store, service)
    }

    fn spawn(&self, vm: &str, role: Role, spec: &[u8]) -> Result<(Child, u32)> {
        let spec = &self.localise(vm, role, spec)[..];
        let tap = match role {
            Role::Primary => serde_json::from_slice::<crate::VmSpec>(spec).ok().and_then(|s| s.net).map(|n| (n.tap, n.bridge)),
            Role::Backup => serde_json::from_slice::<crate::vm::BackupSpec>(spec).ok().and_then(|s| Some((s.tap?, s.bridge))),
        };
        // A voted VM's instances have taps of their own (`vigil local`); its backup (mode 4)
        // runs no VM until it takes over (`vigil local --receive`).
        let local = match role {
            Role::Primary => serde_json::from_slice::<crate::VmSpec>(spec).ok().is_some_and(|s| s.local.is_some()),
            Role::Backup => voted_backup(spec),
        };
        if let (Some((tap, Some(bridge))), false) = (tap, local) {
            ensure_tap(&tap, &bridge).map_err(|reason| Error::Spec { vm: vm.into(), reason })?;
        }
        let file = self.spec_file(vm, role);
        std::fs::write(&file, spec).map_err(|e| Error::io("cannot write", &file, e))?;
        let log_path = self.cfg.state_dir.join(format!("{vm}.{}.log", role.name()));
        let log = File::options().create(true).append(true).open(&log_path).map_err(|e| Error::io("cannot open", &log_path, e))?;
        let log2 = log.try_clone().map_err(|e| Error::io("cannot open", &log_path, e))?;
        let mut cmd = Command::new(&self.cfg.exe);
        match role {
            Role::Primary if local => cmd.arg("local").arg("--store").arg(&self.cfg.store).arg("--spec"),
            Role::Primary => cmd.args(["vm", "run", "--spec"]),
            Role::Backup if local => cmd.args(["local", "--receive", "--vm", vm, "--spec"]),
            Role::Backup => cmd.args(["backup", "--spec"]),
        };
        cmd.arg(&file).stdin(Stdio::null()).stdout(log).stderr(log2);
        // SAFETY: between fork and exec the closure only calls setsid(2), which is
        // async-signal-safe and allocates nothing.
        unsafe {
            // Its own session: the VMM outlives the agent (a crashed agent must not take its
            // VMs down) and signals to the agent's process group do not reach it.
            cmd.pre_exec(|| {
                if libc::setsid() == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|e| Error::io("cannot start", &self.cfg.exe, e))?;
        let pid = child.id();
        Ok((child, pid))
    }

    /// The source side of a migration: pauses the VM and writes its snapshot into `dir`
    /// through its control socket, tells the destination (the migration record), and ends it.
    fn migrate_out(&mut self, store: &mut store::Client, vm: &str, c: &mut Copy, dir: &Path) -> Result<cluster::Migration> {
        let spec: crate::VmSpec = serde_json::from_slice(&c.spec).map_err(|e| Error::Cluster(format!("{vm}: its spec: {e}")))?;
        let api = spec.api.ok_or_else(|| Error::Spec { vm: vm.into(), reason: "no control socket: cannot migrate".into() })?;
        let paused_at_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        let t0 = Instant::now();
        let _ = std::fs::remove_dir_all(dir);
        let reply = vmm::api::call(&api, &vmm::Command::Snapshot { dir: dir.to_path_buf() })
            .map_err(|source| Error::Vmm { vm: vm.into(), source })?;
        if !reply.ok {
            return Err(Error::Spec { vm: vm.into(), reason: format!("snapshot: {}", reply.error.unwrap_or_default()) });
        }
        // The disk goes with the memory (the VM is paused and its block requests are
        // synchronous: nothing writes it now); the destination moves it into place.
        if let Some(disk) = spec.disk.as_deref().map(|d| self.disk_path(d)) {
            let to = dir.join(crate::vm::SNAPSHOT_DISK);
            std::fs::copy(&disk, &to).map_err(|e| Error::Spec {
                vm: vm.into(),
                reason: format!("cannot copy its disk {} into the snapshot {}: {e}", disk.display(), to.display()),
            })?;
        }
        let m = cluster::Migration {
            dir: dir.to_path_buf(),
            from: self.cfg.host.clone(),
            paused_at_ms,
            snapshot_ms: t0.elapsed().as_secs_f64() * 1e3,
        };
        cluster::write(store, &cluster::migration_path(vm), &m)?;
        let _ = vmm::api::call(&api, &vmm::Command::Quit);
        Ok(m)
    }

    /// One step of a pre-copy migration of `vm` away from this host: asks its VMM process to
    /// protect it to the destination (again every second until it says it does: asking is
    /// idempotent), and once the destination holds a committed replica, to hand it over. The
    /// process reports the handover by ending with status 0; the manager then makes the
    /// destination's copy the VM's primary. A restarted agent simply asks again.
    fn migrate_step(&mut self, store: &mut store::Client, vm: &str, m: &cluster::MigrateTo) {
        let host = self.cfg.host.clone();
        let Some(c) = self.copies.get(vm).filter(|c| c.role == Role::Primary && c.state == CopyState::Running) else { return };
        let Some(api) = serde_json::from_slice::<crate::VmSpec>(&c.spec).ok().and_then(|s| s.api) else { return };
        let sock = crate::migration::socket_path(&api);
        let state_file = self.state_file(vm);
        let protected = crate::protection::primary::ReplicationState::load(&state_file).is_some_and(|s| s.protected);
        let st = self.migrations.entry(vm.to_string()).or_default();
        // The protection the state file reports counts only once the process accepted the
        // destination as its backup (a replicated VM is protected to its old backup until
        // then); the handover names the destination too, so it can never go to another copy.
        if protected && st.started {
            let since = *st.protected_since.get_or_insert_with(Instant::now);
            // Asked again after a while: a handover refused by the arbiter resumes the VM.
            if st.handover_asked.is_some_and(|t| t.elapsed() < Duration::from_secs(2)) || since.elapsed() < handover_delay() {
                return;
            }
            let handover = crate::migration::Request::Handover { to: Some(m.protection.backup.clone()) };
            match crate::migration::call(&sock, &handover) {
                Ok(detail) => {
                    let first = st.handover_asked.is_none();
                    st.handover_asked = Some(Instant::now());
                    if first {
                        let what = format!("{vm}: pre-copy to {}: the destination holds a replica; {detail}", m.host);
                        tracing::info!("agent {host}: {what}");
                        let _ = cluster::log_event(store, &Event::now(&host, what));
                    }
                }
                Err(e) => tracing::debug!("agent {host}: {vm}: handover not started yet: {e}"),
            }
        } else if st.asked.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            st.asked = Some(Instant::now());
            let mut p = m.protection.clone();
            p.state_file = Some(state_file);
            p.arbiter = lease_service(&self.cfg.store, &p.arbiter);
            match crate::migration::call(&sock, &crate::migration::Request::Protect(Box::new(p))) {
                Ok(detail) if !st.started => {
                    st.started = true;
                    let what = format!("{vm}: pre-copy migration to {} started ({detail})", m.host);
                    tracing::info!("agent {host}: {what}");
                    let _ = cluster::log_event(store, &Event::now(&host, what));
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!("agent {host}: {vm}: cannot start the migration to {}: {e}", m.host);
                    let _ = cluster::log_event(store, &Event::now(&host, format!("{vm}: cannot migrate to {} yet: {e}", m.host)));
                }
            }
        }
    }

    /// Takes over the VMMs a previous agent of this host started and that still run.
    fn adopt(&mut self, store: &mut store::Client) -> Result<()> {
        for vm in cluster::children(store, cluster::VMS)? {
            let Some(a) = cluster::read::<Actual>(store, &cluster::actual_path(&vm, &self.cfg.host))? else { continue };
            if !matches!(a.state, CopyState::Running | CopyState::Backup) {
                continue;
            }
            let role = if a.state == CopyState::Backup { Role::Backup } else { Role::Primary };
            let file = self.spec_file(&vm, role);
            if a.pid != 0 && alive(a.pid) && runs_file(a.pid, &file) {
                let spec = std::fs::read(&file).unwrap_or_default();
                tracing::info!("agent {}: adopted the {} of {vm} (pid {})", self.cfg.host, role.name(), a.pid);
                self.copies.insert(
                    vm.clone(),
                    Copy {
                        role,
                        pid: a.pid,
                        child: None,
                        spec,
                        generation: a.generation,
                        restarts: a.restarts,
                        retry_at: None,
                        state: a.state,
                        detail: String::new(),
                        left_to_backup: false,
                    },
                );
            }
        }
        self.kill_orphans(store);
        Ok(())
    }

    /// Kills the processes running one of this host's spec files that no record names — a
    /// copy the previous agent started and was replaced (by its respawner) before it recorded
    /// it. Left alive, such an orphan holds the copy's port and tap, and the copy this agent
    /// starts in its place crash-loops (found by the mode 4 test under load).
    fn kill_orphans(&mut self, store: &mut store::Client) {
        let files = spec_files(&self.cfg.state_dir);
        if files.is_empty() {
            return;
        }
        let adopted: Vec<u32> = self.copies.values().map(|c| c.pid).collect();
        let Ok(procs) = std::fs::read_dir("/proc") else { return };
        for pid in procs.flatten().filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok()) {
            if adopted.contains(&pid) || pid == std::process::id() || !alive(pid) {
                continue;
            }
            if let Some(f) = files.iter().find(|f| runs_file(pid, f)) {
                // SAFETY: kill(2) of a process running this host's spec file (checked above).
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                let what = format!("killed pid {pid}, left running {} by the previous agent but never recorded", f.display());
                tracing::warn!("agent {}: {what}", self.cfg.host);
                let _ = cluster::log_event(store, &Event::now(&self.cfg.host, what));
            }
        }
    }

    /// Stops every copy (the host may be declared failed soon), remembering the voted
    /// primaries' replicas to resume from if the host is not.
    fn self_fence(&mut self, why: &str) {
        let voted = self.copies.iter().filter(|(_, c)| c.role == Role::Primary && voted_primary(&c.spec));
        let voted: Vec<(String, Option<PathBuf>)> = voted.map(|(vm, c)| (vm.clone(), resumed(&c.spec))).collect();
        self.self_fenced.extend(voted);
        let replicated: Vec<(String, Vec<u8>, u64, u32)> = self
            .copies
            .iter()
            .filter(|(_, c)| c.role == Role::Primary && replicated_primary(&c.spec))
            .map(|(vm, c)| (vm.clone(), c.spec.clone(), c.generation, c.restarts))
            .collect();
        self.stop_all(why);
        for (vm, spec, generation, restarts) in replicated {
            self.leave_to_backup(&vm, spec, generation, restarts);
        }
    }

    /// How long a replicated primary stopped by self-fencing waits for its backup to take it
    /// over: the backup notices the silence within its replication timeout and takes over once
    /// the primary's lease has run out; the manager then moves the VM there.
    fn takeover_grace(&self) -> Duration {
        (self.cfg.lease * 4).max(Duration::from_secs(5))
    }

    /// Records `vm`'s primary as stopped here and left to its backup (reported failed: the
    /// manager moves the VM to the backup once it took over).
    fn leave_to_backup(&mut self, vm: &str, spec: Vec<u8>, generation: u64, restarts: u32) {
        let grace = self.takeover_grace();
        let copy = Copy {
            role: Role::Primary,
            pid: 0,
            child: None,
            spec,
            generation,
            restarts,
            retry_at: Some(Instant::now() + grace),
            state: CopyState::Failed,
            detail: format!(
                "stopped while the host fenced itself; its backup takes it over (started here again after {} s if not)",
                grace.as_secs()
            ),
            left_to_backup: true,
        };
        self.copies.insert(vm.to_string(), copy);
    }

    fn stop_all(&mut self, why: &str) {
        tracing::warn!("agent {}: {why}: stopping {} VMM(s)", self.cfg.host, self.copies.len());
        for c in self.copies.values_mut() {
            stop(c);
        }
        self.copies.clear();
    }
}

/// Self-fencing that does not depend on the agent's loop. The [`Renewer`] renews the host's
/// lease through the store; a partition or a stalled store can block it for longer than half
/// the lease — and a respawner may replace an agent by one that cannot reach the store to
/// learn its VMs. The watchdog, a thread of its own, SIGKILLs every
/// process running one of the host's spec files (VMMs, backups, voters: the same test
/// [`Agent::kill_orphans`] uses) once nine tenths of a lease have passed since the start of
/// the last renewal, so the host's VMs stop before the manager can declare the host failed
/// and start them elsewhere, with no store and no agent state.
///
/// The last renewal's time is also kept in a file (`agent.renewed`, the host's monotonic
/// clock), so that an agent started after another (its respawner replaced it) counts from
/// the previous agent's last renewal, not from its own start. A thread of its own writes the
/// file, and logs what the renewals report ([`Watchdog::say`]): neither a renewal nor the
/// watchdog ever waits for the disk (a `write(2)` blocks while the file system commits its
/// journal, hundreds of milliseconds when another process writes much to the same disk). A file
/// written late holds an older time: a successor fences sooner, never later.
///
/// The watchdog's thread, which never waits for anything but its tick, also sends the
/// respawner's heartbeat ([`ALIVE_FD`]) while the agent's loop has begun a round within
/// [`LOOP_STUCK`]: an agent stopped whole (SIGSTOP) is replaced within the respawner's short
/// limit, one whose loop is stuck within that longer one, and one merely waiting for a slow
/// store never.
#[derive(Clone)]
struct Watchdog {
    /// Start of the last successful renewal (ns of the host's monotonic clock).
    renewed_ns: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// It stopped the host's VMs since the loop last asked.
    fired: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Lines for the log, written by the reporting thread.
    notes: std::sync::mpsc::SyncSender<String>,
    /// When the agent's loop last began a round (ns of the host's monotonic clock).
    loop_ns: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// How long the loop may go without a round before the agent stops holding the host
    /// ([`LOOP_STUCK`]).
    loop_stuck: Duration,
}

/// Rewrites the host's heartbeat with the next beat (renews the host's lease), from `store`.
/// The heartbeat is a volatile node ([`cluster::VOLATILE_HEARTBEATS`]): the store answers
/// without waiting for its disk.
fn renew(cfg: &Config, store: &mut store::Client, beat: &std::sync::atomic::AtomicU64, watchdog: &Watchdog) -> Result<()> {
    let started = Instant::now();
    let started_ns = monotonic_ns();
    let since = watchdog.since_renewal();
    let next = beat.fetch_add(1, std::sync::atomic::Ordering::AcqRel) + 1;
    store.write(&cluster::heartbeat_path(&cfg.host), next.to_string().as_bytes())?;
    // A renewal late or slow is what a false self-fencing grows from: said, with which.
    let took = started.elapsed();
    if since + took > cfg.lease / 4 {
        watchdog.say(format!(
            "agent {}: lease renewed {:.0} ms after the last one (the store took {:.1} ms)",
            cfg.host,
            (since + took).as_secs_f64() * 1e3,
            took.as_secs_f64() * 1e3
        ));
    }
    watchdog.renewed(started_ns);
    Ok(())
}

/// Names the descriptor (inherited from `vigil agent --respawn`) of the pipe the agent's
/// heartbeat for its respawner goes to: a byte every period.
pub const ALIVE_FD: &str = "VIGIL_AGENT_ALIVE_FD";

/// How long the agent's loop may go without finishing a round before its respawner is told
/// nothing more (and replaces the agent): far longer than a round that waits for a slow store.
const LOOP_STUCK: Duration = Duration::from_secs(10);

/// Renews the host's lease every period on a thread and a store connection of its own, so that
/// the agent's loop — whose reads wait for the store's disk, and which starts and stops VMs —
/// never delays a renewal. Stops when dropped.
struct Renewer {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// The writing end of the respawner's heartbeat pipe, if this agent has a respawner.
fn alive_pipe() -> Option<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    let fd: i32 = std::env::var(ALIVE_FD).ok()?.parse().ok().filter(|&fd| fd > 2)?;
    std::env::remove_var(ALIVE_FD);
    // SAFETY: fstat(2) and fcntl(2) only query the descriptor; it is taken over below only if
    // it is an open pipe.
    let (flags, is_pipe) = unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        (libc::fcntl(fd, libc::F_GETFL), libc::fstat(fd, &mut st) == 0 && st.st_mode & libc::S_IFMT == libc::S_IFIFO)
    };
    if flags < 0 || !is_pipe {
        tracing::warn!("agent: {ALIVE_FD}={fd} is not an open pipe: no heartbeat for the respawner");
        return None;
    }
    // SAFETY: fcntl(2) on an open descriptor: never block on a full pipe; not inherited further.
    unsafe {
        libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
        libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
    }
    // SAFETY: an open descriptor the respawner gave this process alone; owned from here on.
    Some(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

impl Renewer {
    fn start(cfg: &Config, beat: std::sync::Arc<std::sync::atomic::AtomicU64>, watchdog: Watchdog) -> Result<Renewer> {
        let mut store = store::Client::connect(&cfg.store)?;
        store.set_retry_for(cfg.lease / 4);
        store.set_request_timeout(cfg.lease / 4);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (dir, stopping) = (cfg.state_dir.clone(), std::sync::Arc::clone(&stop));
        let cfg = cfg.clone();
        std::thread::Builder::new()
            .name("lease-renewer".into())
            .spawn(move || {
                let mut last_error: Option<Instant> = None;
                while !stopping.load(std::sync::atomic::Ordering::Acquire) {
                    let t0 = Instant::now();
                    // An agent whose loop is stuck does not hold the host: the lease lapses
                    // and the watchdog fences the host (a respawner replaces the agent first).
                    if watchdog.since_loop() >= watchdog.loop_stuck {
                        if last_error.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                            watchdog.say(format!(
                                "agent {}: its loop has not gone round for {:?}: the lease is not renewed",
                                cfg.host, watchdog.loop_stuck
                            ));
                            last_error = Some(Instant::now());
                        }
                    } else if let Err(e) = renew(&cfg, &mut store, &beat, &watchdog) {
                        if last_error.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                            watchdog.say(format!("agent {}: renewing the host's lease: {e}", cfg.host));
                            last_error = Some(Instant::now());
                        }
                    }
                    std::thread::sleep(cfg.period.saturating_sub(t0.elapsed()));
                }
            })
            .map_err(|e| Error::io("cannot start the lease renewer of", &dir, e))?;
        Ok(Renewer { stop })
    }
}

impl Drop for Renewer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
    }
}

/// The host's monotonic clock (ns): the same for every process of the host.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime(2) writes the timespec we own; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

impl Watchdog {
    fn start(cfg: &Config) -> Watchdog {
        Watchdog::start_with(cfg, LOOP_STUCK)
    }

    /// [`Watchdog::start`] with another limit for a stuck loop.
    fn start_with(cfg: &Config, loop_stuck: Duration) -> Watchdog {
        use std::sync::atomic::Ordering;
        // First, while this process has no other thread (the variable is removed from the
        // environment the agent's children inherit).
        let alive = alive_pipe();
        let file = cfg.state_dir.join("agent.renewed");
        let now = monotonic_ns();
        let previous = std::fs::read(&file).ok().and_then(|b| Some(u64::from_le_bytes(b.get(..8)?.try_into().ok()?))).filter(|&t| t <= now);
        let (notes, said) = std::sync::mpsc::sync_channel::<String>(64);
        let w = Watchdog {
            renewed_ns: std::sync::Arc::new(previous.unwrap_or(now).into()),
            fired: Default::default(),
            notes,
            loop_ns: std::sync::Arc::new(now.into()),
            loop_stuck,
        };
        let (renewed, tick) = (std::sync::Arc::clone(&w.renewed_ns), (cfg.lease / 20).max(Duration::from_millis(2)));
        let reporter = std::thread::Builder::new().name("renewal-reporter".into()).spawn(move || {
            let mut written = None;
            loop {
                match said.recv_timeout(tick) {
                    Ok(line) => tracing::warn!("{line}"),
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
                }
                let at = renewed.load(Ordering::Acquire);
                if written != Some(at) && std::fs::write(&file, at.to_le_bytes()).is_ok() {
                    written = Some(at);
                }
            }
        });
        if let Err(e) = reporter {
            tracing::error!("agent {}: cannot start the renewal reporter: {e}", cfg.host);
        }
        // Nine tenths of the lease (and a tick): well after the loop's own self-fencing (half),
        // which is the rule while the loop runs, so that a loop merely slow under load is not
        // overruled; still before the manager can declare the host failed (a lease after it
        // saw the last renewal), and a VM restarted elsewhere starts later still (the plan,
        // the other host's agent, the VMM's start).
        let (me, limit, dir, host) = (w.clone(), cfg.lease.as_nanos() as u64 * 9 / 10, cfg.state_dir.clone(), cfg.host.clone());
        let tick = (cfg.lease / 20).max(Duration::from_millis(2));
        let spawned = std::thread::Builder::new().name("fencing-watchdog".into()).spawn(move || {
            use std::os::fd::AsRawFd;
            let mut armed = true;
            loop {
                // The respawner's heartbeat, while the loop goes round.
                let round = monotonic_ns().saturating_sub(me.loop_ns.load(Ordering::Acquire));
                if let Some(fd) = alive.as_ref().filter(|_| round < me.loop_stuck.as_nanos() as u64) {
                    // SAFETY: writes one byte from a live local to a non-blocking pipe we own.
                    unsafe { libc::write(fd.as_raw_fd(), [1u8].as_ptr().cast(), 1) };
                }
                let since = monotonic_ns().saturating_sub(me.renewed_ns.load(Ordering::Acquire));
                if since <= limit {
                    armed = true;
                } else if armed {
                    armed = false;
                    let killed = kill_host_processes(&dir);
                    if !killed.is_empty() {
                        me.fired.store(true, Ordering::Release);
                        tracing::warn!(
                            "agent {host}: the lease was last renewed {:.0} ms ago: self-fencing, killed {killed:?}",
                            since as f64 / 1e6
                        );
                    }
                }
                std::thread::sleep(tick);
            }
        });
        if let Err(e) = spawned {
            tracing::error!("agent {}: cannot start the fencing watchdog: {e}", cfg.host);
        }
        w
    }

    /// A renewal that started at `at_ns` ([`monotonic_ns`]) succeeded.
    fn renewed(&self, at_ns: u64) {
        self.renewed_ns.fetch_max(at_ns, std::sync::atomic::Ordering::AcqRel);
    }

    /// Logs `line` from the reporting thread (dropped if 64 lines wait already).
    fn say(&self, line: String) {
        let _ = self.notes.try_send(line);
    }

    /// The agent's loop begins a round.
    fn looped(&self) {
        self.loop_ns.store(monotonic_ns(), std::sync::atomic::Ordering::Release);
    }

    /// Time since the agent's loop last began a round.
    fn since_loop(&self) -> Duration {
        Duration::from_nanos(monotonic_ns().saturating_sub(self.loop_ns.load(std::sync::atomic::Ordering::Acquire)))
    }

    /// Time since the start of the last successful renewal.
    fn since_renewal(&self) -> Duration {
        Duration::from_nanos(monotonic_ns().saturating_sub(self.renewed_ns.load(std::sync::atomic::Ordering::Acquire)))
    }

    fn take_fired(&self) -> bool {
        self.fired.swap(false, std::sync::atomic::Ordering::AcqRel)
    }
}

/// SIGKILLs every process running one of the spec files in `state_dir`; their pids.
fn kill_host_processes(state_dir: &Path) -> Vec<u32> {
    let files = spec_files(state_dir);
    let mut killed = Vec::new();
    if files.is_empty() {
        return killed;
    }
    let Ok(procs) = std::fs::read_dir("/proc") else { return killed };
    for pid in procs.flatten().filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok()) {
        if pid != std::process::id() && alive(pid) && files.iter().any(|f| runs_file(pid, f)) {
            // SAFETY: kill(2) of a process running this host's spec file (checked above).
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            killed.push(pid);
        }
    }
    killed
}

/// The host's spec files (a copy's process runs one: `vm run --spec`, `backup --spec`, ...).
fn spec_files(state_dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(state_dir) else { return Vec::new() };
    entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file() && p.to_str().is_some_and(|n| n.ends_with(".primary.json") || n.ends_with(".backup.json")))
        .collect()
}

/// Creates tap `tap` (if missing), attaches it to `bridge` and brings it up.
fn ensure_tap(tap: &str, bridge: &str) -> std::result::Result<(), String> {
    let ip = |args: &[&str]| -> std::result::Result<(), String> {
        let out = Command::new("ip").args(args).output().map_err(|e| format!("cannot run ip (package iproute2): {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
        }
    };
    if !Path::new("/sys/class/net").join(tap).exists() {
        ip(&["tuntap", "add", "dev", tap, "mode", "tap"])?;
    }
    ip(&["link", "set", tap, "master", bridge])?;
    ip(&["link", "set", tap, "up"])
}

/// How long a migration's destination waits for the source's snapshot before starting afresh.
const MIGRATION_WAIT: Duration = Duration::from_secs(10);

/// Whether two backup specs differ at most in the policy the backup runs after a takeover.
fn only_after_takeover(a: &[u8], b: &[u8]) -> bool {
    match (serde_json::from_slice::<crate::vm::BackupSpec>(a), serde_json::from_slice::<crate::vm::BackupSpec>(b)) {
        (Ok(mut a), Ok(b)) => {
            a.then_policy = b.then_policy;
            a.then_protect = b.then_protect.clone();
            a == b
        }
        _ => false,
    }
}

/// A primary's spec without its snapshot to restore (a fresh start).
fn fresh_spec(spec: &[u8]) -> Vec<u8> {
    match serde_json::from_slice::<crate::VmSpec>(spec) {
        Ok(mut s) if s.restore.is_some() => {
            s.restore = None;
            serde_json::to_vec_pretty(&s).unwrap_or_else(|_| spec.to_vec())
        }
        _ => spec.to_vec(),
    }
}

fn backoff(restarts: u32) -> Duration {
    Duration::from_millis(100u64 << restarts.min(6))
}

fn stop(c: &mut Copy) {
    if c.pid != 0 && matches!(c.state, CopyState::Running | CopyState::Backup) {
        // SAFETY: kill(2) with a pid we started or adopted (checked alive and running our
        // spec file); no memory is involved.
        unsafe { libc::kill(c.pid as i32, libc::SIGKILL) };
    }
    if let Some(mut child) = c.child.take() {
        let _ = child.wait();
    }
    c.state = CopyState::Failed;
}

/// Whether process `pid` exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next()).is_some_and(|st| st != "Z" && st != "X"),
        Err(_) => false,
    }
}

/// Whether process `pid` runs with `file` among its arguments (a VMM of ours, not a reused pid).
fn runs_file(pid: u32, file: &Path) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else { return false };
    let want = file.as_os_str().as_encoded_bytes();
    cmdline.split(|b| *b == 0).any(|a| a == want)
}

/// An exclusive lock on `path` for as long as the file stays open: a second agent for the same
/// host (same state directory) is refused; a crashed agent's lock goes with its process.
fn lock(path: &Path, host: &str) -> Result<File> {
    let f = File::options().create(true).truncate(false).write(true).open(path).map_err(|e| Error::io("cannot open", path, e))?;
    // SAFETY: flock(2) on a descriptor we own.
    if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&f), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let holder = std::fs::read_to_string(path).unwrap_or_default();
        return Err(Error::Cluster(format!(
            "host {host} already has an agent{} (lock {} held)",
            if holder.trim().is_empty() { String::new() } else { format!(" (pid {})", holder.trim()) },
            path.display()
        )));
    }
    let _ = f.set_len(0);
    let _ = std::io::Write::write_all(&mut &f, std::process::id().to_string().as_bytes());
    Ok(f)
}

/// Fault injection for tests: `VIGIL_AGENT_CRASH_AFTER_SPAWN=HOST:VM` makes HOST's agent abort
/// right after it started a copy of VM, before it recorded it — once (a marker file in its
/// state directory remembers), as an agent replaced by its respawner at that moment would.
fn crash_after_spawn(state_dir: &Path, host: &str, vm: &str) {
    let Ok(want) = std::env::var("VIGIL_AGENT_CRASH_AFTER_SPAWN") else { return };
    let marker = state_dir.join("crashed-after-spawn");
    if want == format!("{host}:{vm}") && !marker.exists() {
        let _ = std::fs::write(&marker, vm);
        tracing::error!("agent {host}: crashing right after starting a copy of {vm} (VIGIL_AGENT_CRASH_AFTER_SPAWN)");
        std::process::abort();
    }
}

/// Fault injection for tests: `VIGIL_AGENT_CRASH_ON_TAKEOVER=HOST:VM` makes HOST's agent, as it
/// is about to turn its voted backup of VM into the primary, SIGKILL the backup's receiver and
/// abort — once (a marker file in its state directory remembers) — as an agent replaced by its
/// respawner at that moment, its receiver stopped by its fencing watchdog, would leave it.
fn crash_on_takeover(state_dir: &Path, host: &str, vm: &str, c: &mut Copy) {
    let Ok(want) = std::env::var("VIGIL_AGENT_CRASH_ON_TAKEOVER") else { return };
    let marker = state_dir.join("crashed-on-takeover");
    if want == format!("{host}:{vm}") && !marker.exists() {
        let _ = std::fs::write(&marker, vm);
        tracing::error!("agent {host}: crashing as it takes {vm} over, its receiver killed (VIGIL_AGENT_CRASH_ON_TAKEOVER)");
        stop(c);
        std::process::abort();
    }
}

/// `service` as the copies of a host whose agent uses the store at `store` ask it.
fn lease_service(store: &std::path::Path, service: &str) -> String {
    match service.parse() {
        Ok(crate::fencing::Service::AgentStore) => format!("store:{}", store.display()),
        _ => service.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first agent of a boot takes the fence it finds as the baseline; a later one of the
    /// same boot keeps that baseline (a fence written meanwhile stops it); a new boot takes
    /// what it finds.
    #[test]
    fn the_fence_baseline_lasts_the_boot() {
        let dir = std::env::temp_dir().join(format!("vigil-fence-baseline-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(fence_baseline(&dir, None), None);
        assert_eq!(fence_baseline(&dir, Some(4)), None, "fenced while an earlier agent of this boot held the host");
        std::fs::write(dir.join("agent.fence-baseline"), br#"{"boot":"another boot","fenced_before":null}"#).unwrap();
        assert_eq!(fence_baseline(&dir, Some(4)), Some(4), "a new boot: the host rejoins");
        assert_eq!(fence_baseline(&dir, Some(7)), Some(4));
        std::fs::write(dir.join("agent.fence-baseline"), b"garbage").unwrap();
        assert_eq!(fence_baseline(&dir, Some(7)), Some(7), "an unreadable baseline is replaced");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A process that runs `spec` (as its argument) for as long as it is left alone.
    fn runs_spec(spec: &Path) -> Child {
        Command::new("sh").args(["-c", "sleep 30"]).arg(spec).spawn().expect("sh")
    }

    fn watchdog_config(name: &str) -> Config {
        let dir = std::env::temp_dir().join(format!("vigil-watchdog-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        Config {
            host: "h".into(),
            store: dir.join("nowhere.sock"),
            state_dir: dir,
            exe: "vigil".into(),
            period: Duration::from_millis(20),
            lease: Duration::from_millis(200),
        }
    }

    /// The agent's loop renews nothing (blocked, or the store unreachable): the watchdog kills
    /// the host's copies nine tenths of a lease after the last renewal — and only them.
    #[test]
    fn the_watchdog_fences_the_host_when_renewals_stop_and_not_before() {
        let cfg = watchdog_config("stop");
        let spec = cfg.state_dir.join("vm.primary.json");
        std::fs::write(&spec, "{}").expect("spec");
        let mut copy = runs_spec(&spec);
        let mut other = Command::new("sh").args(["-c", "sleep 30"]).spawn().expect("sh");
        let w = Watchdog::start(&cfg);
        // Renewed every 20 ms for 400 ms: nothing happens.
        for _ in 0..20 {
            w.renewed(monotonic_ns());
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(copy.try_wait().expect("wait").is_none(), "killed while the lease was renewed");
        assert!(!w.take_fired());
        // It sleeps between looks: a watchdog that spun would take a core from the VMs (the
        // agents of a CI run once loaded the host to 6 this way). CPU time of the watchdog
        // threads of this test process, in clock ticks (10 ms).
        let ticks: u64 = std::fs::read_dir("/proc/self/task")
            .expect("tasks")
            .flatten()
            .filter(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == "fencing-watchdo"))
            .filter_map(|t| {
                let stat = std::fs::read_to_string(t.path().join("stat")).ok()?;
                let f: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
                Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
            })
            .sum();
        assert!(ticks <= 5, "the watchdog threads used {ticks} clock ticks of CPU in 400 ms");
        // Renewals stop: killed 180 ms (and a tick) later.
        let stopped = Instant::now();
        let st = copy.wait().expect("wait");
        let after = stopped.elapsed();
        assert!(!st.success() && after >= Duration::from_millis(150) && after < Duration::from_millis(1000), "{st:?} after {after:?}");
        // (It reports once it has looked at every process: shortly after the kill.)
        let t = Instant::now();
        while !w.take_fired() {
            assert!(t.elapsed() < Duration::from_secs(2), "the kill is reported");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(!w.take_fired(), "reported once");
        assert!(other.try_wait().expect("wait").is_none(), "a process not running a spec of the host is left alone");
        let _ = other.kill();
        let _ = other.wait();
        let _ = std::fs::remove_dir_all(&cfg.state_dir);
    }

    /// The renewer renews the host's lease while the agent's loop goes round, stops once the
    /// loop has not gone round for the stuck limit (here 300 ms instead of 10 s), and the
    /// watchdog then fences the host; a loop that goes round again renews again.
    #[test]
    fn a_stuck_loop_stops_renewing_and_the_host_is_fenced() {
        let mut cfg = watchdog_config("stuck");
        // As `vigil up` serves it: heartbeats do not wait for the disk.
        let sc = store::server::Config {
            volatile: vec![cluster::VOLATILE_HEARTBEATS.into()],
            ..store::server::Config::local(cfg.state_dir.join("store.sock"), cfg.state_dir.join("store"))
        };
        let server = store::server::Server::bind(&sc).expect("store");
        std::thread::spawn(move || server.run());
        cfg.store = sc.socket.clone();
        let spec = cfg.state_dir.join("vm.primary.json");
        std::fs::write(&spec, "{}").expect("spec");
        let mut copy = runs_spec(&spec);
        let w = Watchdog::start_with(&cfg, Duration::from_millis(300));
        let beat = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let renewer = Renewer::start(&cfg, std::sync::Arc::clone(&beat), w.clone()).expect("renewer");
        let mut reader = store::Client::connect(&sc.socket).expect("client");
        let heartbeat = || beat.load(std::sync::atomic::Ordering::Acquire);
        // The loop goes round every 20 ms for 600 ms: renewed all along, nobody fenced.
        for _ in 0..30 {
            w.looped();
            std::thread::sleep(Duration::from_millis(20));
        }
        let going = heartbeat();
        assert!(going >= 15, "{going} renewals in 600 ms at a period of 20 ms");
        // (Renewed on meanwhile: the store holds this beat or a later one.)
        let stored: u64 =
            String::from_utf8(reader.read(&cluster::heartbeat_path("h")).expect("heartbeat")).expect("utf-8").parse().expect("a beat");
        // (The beat is counted before its write: `going` may still be on its way.)
        assert!(stored + 1 >= going && stored <= heartbeat(), "the store holds beat {stored}, the renewer counted {going}");
        assert!(copy.try_wait().expect("wait").is_none(), "fenced while the loop went round");
        // The loop stops: renewals stop 300 ms later, the watchdog fences 180 ms after that.
        let stuck = Instant::now();
        let st = copy.wait().expect("wait");
        let after = stuck.elapsed();
        assert!(!st.success() && after >= Duration::from_millis(400) && after < Duration::from_millis(2000), "{st:?} after {after:?}");
        let stopped = heartbeat();
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(heartbeat(), stopped, "renewed while the loop was stuck");
        // It goes round again: renewed again.
        for _ in 0..10 {
            w.looped();
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(heartbeat() > stopped, "not renewed once the loop went round again");
        drop(renewer);
        let _ = std::fs::remove_dir_all(&cfg.state_dir);
    }

    /// A new agent counts from the previous agent's last renewal (kept in a file), not from
    /// its own start: one started long after it fences at once if it cannot renew.
    #[test]
    fn the_watchdog_counts_from_the_previous_agents_last_renewal() {
        let cfg = watchdog_config("previous");
        let spec = cfg.state_dir.join("vm.backup.json");
        std::fs::write(&spec, "{}").expect("spec");
        let mut copy = runs_spec(&spec);
        // The previous agent's last renewal, a second ago, as it left it.
        std::fs::write(cfg.state_dir.join("agent.renewed"), monotonic_ns().saturating_sub(1_000_000_000).to_le_bytes()).expect("file");
        let t = Instant::now();
        let _new = Watchdog::start(&cfg);
        let st = copy.wait().expect("wait");
        assert!(!st.success() && t.elapsed() < Duration::from_millis(500), "{st:?} after {:?}", t.elapsed());
        let _ = std::fs::remove_dir_all(&cfg.state_dir);
    }

    #[test]
    fn a_backup_is_started_again_for_anything_but_what_it_does_after_a_takeover() {
        let spec = |then: &str, listen: &str, next: &str| {
            serde_json::to_vec_pretty(&serde_json::json!({
                "listen": listen, "arbiter": "10.0.0.254:7000", "holder": "hostB", "then_policy": then, "key_file": "k",
                "then_protect": next
            }))
            .unwrap()
        };
        let (a, c) = ("10.0.0.1:7100", "10.0.0.3:7100");
        assert!(only_after_takeover(&spec("fixed:25", "10.0.0.2:7100", a), &spec("fixed:10", "10.0.0.2:7100", a)));
        assert!(only_after_takeover(&spec("fixed:25", "10.0.0.2:7100", a), &spec("fixed:25", "10.0.0.2:7100", a)));
        assert!(only_after_takeover(&spec("fixed:25", "10.0.0.2:7100", a), &spec("fixed:10", "10.0.0.2:7100", c)), "its next backup");
        assert!(!only_after_takeover(&spec("fixed:25", "10.0.0.2:7100", a), &spec("fixed:10", "10.0.0.3:7100", a)));
        assert!(!only_after_takeover(b"garbage", &spec("fixed:10", "10.0.0.2:7100", a)));
    }
}
