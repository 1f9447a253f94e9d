//! From the model to running VMs: the cluster's network layout and the `VmSpec` of each copy
//! of each VM on a host (its tap on the host's bridge, its address, its control socket, its
//! protection by a backup on another host, the arbiter).

use crate::table::{key, Table, Target};
use agent::cluster::{Desired, MigrateFrom, MigrateTo, Placed, PlacedBackup};
use agent::vm::{BackupSpec, Ipv4Cidr, Mac, NetSpec, Protection, TimingSpec};
use agent::VmSpec;
use model::Loaded;
use model::Mode;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;

/// First TCP port of the backups' replication listeners (one per VM: port + VM index).
pub const REPLICATION_PORT: u16 = 7100;

/// Where things are on the cluster's network.
#[derive(Debug, Clone)]
pub struct Layout {
    /// Each host's address on the cluster's LAN (its backups listen there).
    pub host_ip: BTreeMap<String, Ipv4Addr>,
    /// The fencing arbiter, HOST:PORT.
    pub arbiter: String,
    /// The cluster's key file (replication and the arbiter authenticate peers with it).
    pub key_file: PathBuf,
    /// The bridge in each host that the VMs' taps join.
    pub bridge: String,
    /// Guest images by the name `[[run]]` gives.
    pub images: BTreeMap<String, PathBuf>,
    /// Directory for the VMs' control sockets.
    pub run_dir: PathBuf,
    /// Heartbeat and lease timing of replication.
    pub timing: TimingSpec,
    /// CPUs of the machine (VMs are pinned to one per model processor when there are enough;
    /// then a VM with a reservation in the model also runs its vCPU under it, SCHED_DEADLINE).
    pub cpus: usize,
    /// The policies `policy = "analysed"` stands for, by VM ([`Layout::analyse_policies`]).
    pub analysed: BTreeMap<String, replication::PolicySpec>,
    /// How a running VM moves off a live host (the plan's `migrate`).
    pub migration: Migration,
}

/// How a running VM moves off a live host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Migration {
    /// Pre-copy over the checkpoint machinery (`agent::migration`): the VM runs while its
    /// memory is copied, then stops for the last dirty pages and a handover.
    #[default]
    PreCopy,
    /// Pause, snapshot, restore on the destination (the VM stops for the whole copy).
    StopAndCopy,
}

impl std::str::FromStr for Migration {
    type Err = String;
    fn from_str(s: &str) -> Result<Migration, String> {
        match s {
            "pre-copy" => Ok(Migration::PreCopy),
            "stop-and-copy" => Ok(Migration::StopAndCopy),
            _ => Err(format!("migration {s:?}: expected pre-copy or stop-and-copy")),
        }
    }
}

/// The checkpoint policy of a VM being copied by pre-copy: a round every 10 ms once the
/// destination holds a replica, so that the last round (the downtime) carries little.
pub const PRECOPY_POLICY: &str = "fixed:10";

/// The `[[run]]` policy that asks the analysis for the interval.
pub const ANALYSED: &str = "analysed";

/// One VM of the model that runs.
struct Runnable<'a> {
    index: usize,
    run: &'a model::run::Run,
    mode: Mode,
    /// Its instances (more than one in local redundancy).
    instances: usize,
}

fn runnables(loaded: &Loaded) -> Vec<Runnable<'_>> {
    let Some(dep) = &loaded.deployment else { return Vec::new() };
    loaded
        .runs
        .iter()
        .filter_map(|r| {
            dep.vms.iter().position(|v| v.name == r.vm).map(|i| Runnable {
                index: i,
                run: r,
                mode: dep.vms[i].mode,
                instances: dep.vms[i].instances.len(),
            })
        })
        .collect()
}

impl Layout {
    fn addr(&self, host: &str, index: usize) -> Option<String> {
        self.host_ip.get(host).map(|ip| format!("{ip}:{}", REPLICATION_PORT as usize + index))
    }

    fn tap(index: usize) -> String {
        format!("vt{index}")
    }

    fn image(&self, r: &model::run::Run) -> PathBuf {
        self.images.get(&r.image).cloned().unwrap_or_else(|| PathBuf::from(&r.image))
    }

    fn net(&self, index: usize, r: &model::run::Run) -> Option<NetSpec> {
        let (addr, prefix_len) = r.ip?;
        let o = addr.octets();
        Some(NetSpec {
            tap: Self::tap(index),
            ip: Some(Ipv4Cidr { addr, prefix_len }),
            gateway: None,
            mac: Some(Mac([0x52, 0x54, o[0], o[1], o[2], o[3]])),
            bridge: Some(self.bridge.clone()),
            backend: if r.net_backend_process { agent::vm::BackendPlace::Process } else { agent::vm::BackendPlace::Vmm },
        })
    }

    /// The VM's disk, if it has one: a relative path, so that each host's agent keeps its own
    /// copy in its state directory (created zeroed where the host has none; the backup's is
    /// filled by the initial synchronisation, a migration's destination's by the migration).
    fn disk(r: &model::run::Run) -> Option<PathBuf> {
        r.disk_mib.map(|_| PathBuf::from(format!("{}.disk", r.vm)))
    }

    fn policy(&self, r: &model::run::Run) -> replication::PolicySpec {
        match r.policy.as_deref() {
            Some(ANALYSED) => self.analysed.get(&r.vm).copied().unwrap_or_default(),
            p => p.and_then(|p| p.parse().ok()).unwrap_or_default(),
        }
    }

    /// Resolves every `policy = "analysed"` of the model: the longest fixed checkpoint interval
    /// whose pauses and held output keep every deadline (`model::replication`). A VM for which
    /// none does keeps the default policy, and the returned notes say so (for the event log).
    pub fn analyse_policies(&mut self, loaded: &model::Loaded) -> Vec<String> {
        let mut notes = Vec::new();
        for r in loaded.runs.iter().filter(|r| r.policy.as_deref() == Some(ANALYSED)) {
            let choice = model::replication::largest_fixed_interval(loaded, &r.vm, None);
            let spec = match &choice {
                Ok(model::replication::Choice { interval: Some(t), .. }) => {
                    format!("fixed:{}", model::units::trim_float(t.to_f64() / 1000.0, 3)).parse::<replication::PolicySpec>().ok()
                }
                _ => None,
            };
            match (spec, choice) {
                (Some(spec), Ok(c)) => {
                    let hold = c.commit.as_ref().map(model::units::human_time).unwrap_or_default();
                    notes.push(format!("{}: analysed checkpoint policy {spec} (output held at most {hold}; every deadline kept)", r.vm));
                    self.analysed.insert(r.vm.clone(), spec);
                }
                (_, Ok(_)) => notes.push(format!("{}: no fixed checkpoint interval keeps every deadline; the default policy runs", r.vm)),
                (_, Err(e)) => notes.push(format!("{}: policy \"analysed\": {e}", r.vm)),
            }
        }
        notes
    }

    /// The spec of `r`'s running copy on `host`, protected by a backup on `backup`.
    fn primary(&self, x: &Runnable, host: &str, backup: Option<&str>, cpus: Vec<usize>) -> VmSpec {
        let r = x.run;
        let mut s = VmSpec::new(self.image(r), r.memory_mib);
        s.name = r.vm.clone();
        s.args = r.args.clone();
        s.net = self.net(x.index, r);
        s.disk = Self::disk(r);
        s.disk_mib = r.disk_mib;
        if r.blk_backend_process {
            s.disk_backend = agent::vm::BackendPlace::Process;
        }
        s.api = Some(self.run_dir.join(format!("{}.{host}.sock", r.vm)));
        s.scheduling.cpus = cpus;
        s.local = self.local(x);
        s.protection = backup.and_then(|b| self.addr(b, x.index)).map(|addr| Protection {
            backup: addr,
            arbiter: self.arbiter.clone(),
            holder: host.to_string(),
            policy: self.policy(r),
            timing: self.timing,
            stats: false,
            control: None,
            state_file: None,
            key_file: self.key_file.clone(),
        });
        s
    }

    /// Local redundancy: voted instances behind the VM's address. In mode local+remote the
    /// voted group is protected as one unit: the backup holds a snapshot and the request log
    /// (`agent::voter::remote`).
    fn local(&self, x: &Runnable) -> Option<agent::voter::LocalSpec> {
        let port = x.run.port?;
        (matches!(x.mode, Mode::Local | Mode::LocalRemote) && x.instances > 1).then_some(agent::voter::LocalSpec {
            instances: x.instances,
            port,
            policy: agent::voter::core::Policy::PreferPrimary,
            hang_timeout_ms: 500,
            resume: None,
            versions: x
                .run
                .versions
                .iter()
                .map(|v| agent::voter::InstanceVersion {
                    instance: v.instance,
                    image: v.image.as_ref().map(|i| self.images.get(i).cloned().unwrap_or_else(|| PathBuf::from(i))),
                    args: v.args.clone(),
                })
                .collect(),
        })
    }

    /// The spec of `r`'s backup on `host`; after a takeover it protects the VM with a backup
    /// on `then`.
    fn backup(&self, x: &Runnable, host: &str, then: Option<&str>) -> Option<BackupSpec> {
        let r = x.run;
        Some(BackupSpec {
            local: self.local(x).filter(|_| x.mode == Mode::LocalRemote),
            listen: self.addr(host, x.index)?,
            arbiter: self.arbiter.clone(),
            holder: host.to_string(),
            tap: self.net(x.index, r).map(|n| n.tap),
            bridge: Some(self.bridge.clone()),
            disk: Self::disk(r),
            disk_mib: r.disk_mib,
            api: Some(self.run_dir.join(format!("{}.{host}.sock", r.vm))),
            control: None,
            stats: false,
            then_protect: then.and_then(|t| self.addr(t, x.index)),
            then_policy: self.policy(r),
            timing: self.timing,
            state_file: None,
            key_file: self.key_file.clone(),
            scheduling: Default::default(),
        })
    }

    /// The desired records that put every runnable VM where `targets` say, for the
    /// configuration where `failed` hosts have failed. A backup's next backup (after it takes
    /// over) is the one the plan for its primary's host failing chooses, from `table`.
    ///
    /// A move that needs the VM's state carried to another host — a running VM moved off a
    /// live host (`migrate`), or a replicated VM activated on a host other than the one
    /// holding its replica — is a pre-copy migration from where the state is (with
    /// [`Migration::StopAndCopy`], an unreplicated VM's snapshot instead). What cannot be
    /// done (a voted group's move, a replicated VM under stop-and-copy, a host without an
    /// address) is not: the VM stays where its state is, and the deviation is returned, so
    /// that the placement in force is never mistaken for the analysed one.
    pub fn desired(
        &self,
        loaded: &Loaded,
        targets: &[Target],
        failed: &[String],
        table: &Table,
        generation: u64,
        current: &BTreeMap<String, Desired>,
    ) -> (BTreeMap<String, Desired>, Vec<String>) {
        let mut out = BTreeMap::new();
        let mut deviations = Vec::new();
        for x in runnables(loaded) {
            let vm = &x.run.vm;
            let t = targets.iter().find(|t| t.vm == *vm);
            let mut host = t.and_then(|t| t.host.clone());
            let remote = matches!(x.mode, Mode::Remote | Mode::LocalRemote);
            let mut backup = t.and_then(|t| t.backup.clone()).filter(|_| remote);
            let cur = current.get(vm);
            let cur_host = cur.and_then(|c| c.primary.as_ref()).map(|p| p.host.clone());
            let cur_backup = cur.and_then(|c| c.backup.as_ref()).map(|b| b.host.clone());
            let alive = |h: &String| !failed.contains(h);
            // A VM migrating by pre-copy has its backup on the destination.
            let cur_migrate = cur.and_then(|c| c.primary.as_ref()).and_then(|p| p.migrate_to.clone());
            // Where the VM's state is now: its live host, or its backup's host after a takeover.
            let state_at = match (&cur_host, &cur_backup) {
                (Some(h), _) if alive(h) => Some(h.clone()),
                (_, Some(b)) if (remote || cur_migrate.as_ref().is_some_and(|m| m.host == *b)) && alive(b) => Some(b.clone()),
                _ => None,
            };
            let mut migrate_from = None;
            if let (Some(s), Some(h)) = (&state_at, &host) {
                if s != h {
                    if !alive(h) {
                        // A plan for fewer failures (or none) than have happened: never move a
                        // VM's state to a failed host.
                        deviations.push(format!("{vm}: the plan in force puts it on the failed host {h}: it stays on {s}"));
                        host = Some(s.clone());
                    } else if self.migration == Migration::PreCopy && ((!remote && cur_host.as_ref() == Some(s)) || x.mode == Mode::Remote)
                    {
                        // A running VM moved off a live host: pre-copy migration. The source
                        // keeps running it, protected to a backup on the destination, until
                        // it hands it over (`agent::migration`); then the manager makes the
                        // destination's copy the primary (`daemon`, migrations).
                        //
                        // A replicated VM goes the same way: the destination replaces its
                        // backup (a new synchronisation), then takes the VM over by a
                        // handover, and protects it to the backup the plan gives it. Its
                        // state may also be on its backup's host after its primary's host
                        // failed (the backup takes over there by itself): when the plan
                        // activates it elsewhere, it runs there first and migrates on.
                        let cur_p = match cur.and_then(|c| c.primary.as_ref()).filter(|p| p.host == *s) {
                            Some(p) => p.clone(),
                            None => Placed {
                                host: s.clone(),
                                spec: self.primary(&x, s, None, Vec::new()),
                                restart: false,
                                migrate_from: None,
                                migrate_to: None,
                            },
                        };
                        let cur_p = &cur_p;
                        let kept = cur_migrate.as_ref().filter(|m| m.host == *h);
                        let to = kept.cloned().or_else(|| {
                            let backup = self.addr(h, x.index)?;
                            Some(MigrateTo {
                                host: h.clone(),
                                protection: Protection {
                                    backup,
                                    arbiter: self.arbiter.clone(),
                                    holder: s.clone(),
                                    policy: PRECOPY_POLICY.parse().unwrap_or_default(),
                                    timing: self.timing,
                                    stats: false,
                                    control: None,
                                    state_file: None,
                                    key_file: self.key_file.clone(),
                                },
                                since_ms: std::time::SystemTime::now()
                                    .duration_since(std::time::UNIX_EPOCH)
                                    .map_or(0, |d| d.as_millis() as u64),
                            })
                        });
                        // After the handover the destination protects the VM to the backup
                        // the plan gives it (none for an unreplicated VM).
                        let backup = self.backup(&x, h, backup.as_deref().filter(|b| b != h));
                        if let (Some(to), Some(spec)) = (to, backup) {
                            let primary = Placed { restart: false, migrate_from: None, migrate_to: Some(to), ..cur_p.clone() };
                            let backup = Some(PlacedBackup { host: h.clone(), spec });
                            out.insert(x.run.vm.clone(), Desired { generation, primary: Some(primary), backup });
                            continue;
                        }
                        deviations.push(format!("{vm}: the plan moves it to {h}, which has no address: it stays on {s}"));
                        host = Some(s.clone());
                    } else if !remote && cur_host.as_ref() == Some(s) {
                        // A running VM moved off a live host: stop-and-copy migration.
                        migrate_from = Some(MigrateFrom { host: s.clone(), dir: self.run_dir.join(format!("migrate-{vm}-{generation}")) });
                    } else {
                        deviations.push(format!(
                            "{vm}: the plan moves it to {h}, which needs its replica carried there (a voted group's, or any under stop-and-copy migration: not done): it stays on {s}"
                        ));
                        host = Some(s.clone());
                    }
                }
            }
            if backup.is_some() && backup == host {
                deviations
                    .push(format!("{vm}: its backup cannot share its host {}: it runs without a backup", host.as_deref().unwrap_or("")));
                backup = None;
            }
            let cpus = t.map(|t| self.cpus_of(loaded, h_or(&host), &t.processors)).unwrap_or_default();
            // Reservations only where each model processor is a CPU of its own (the agent's
            // `auto` enforcer picks the kernel's SCHED_DEADLINE, or the VMM's server on nested
            // PVM).
            let reservation = if cpus.is_empty() { None } else { reservation_of(loaded, x.index) };
            let primary = host.as_deref().map(|h| {
                let mut spec = self.primary(&x, h, backup.as_deref(), cpus.clone());
                spec.scheduling.reservation = reservation;
                spec.restore = migrate_from.as_ref().map(|m| m.dir.clone());
                // A voted group's voter is restarted by its agent (its backup holds a replica
                // but takes over only when the manager moves the VM there).
                let restart = !remote || spec.local.is_some();
                Placed { host: h.to_string(), spec, restart, migrate_from: migrate_from.clone(), migrate_to: None }
            });
            let backup = match (&host, &backup) {
                (Some(h), Some(b)) => {
                    let mut next = failed.to_vec();
                    next.push(h.clone());
                    let then = table
                        .lookup(&key(&next))
                        .and_then(|p| p.target(&x.run.vm))
                        .filter(|t| t.host.as_deref() == Some(b))
                        .and_then(|t| t.backup.clone());
                    self.backup(&x, b, then.as_deref()).map(|mut spec| {
                        spec.scheduling.reservation = reservation;
                        PlacedBackup { host: b.clone(), spec }
                    })
                }
                _ => None,
            };
            out.insert(x.run.vm.clone(), Desired { generation, primary, backup });
        }
        (out, deviations)
    }
}

/// The CBS reservation the model gives VM `index` (its `budget` every `period`: the runtime
/// rounded up, the period down, to whole microseconds, so the reservation is never less than
/// the analysed one).
fn reservation_of(loaded: &Loaded, index: usize) -> Option<agent::realtime::Reservation> {
    let r = loaded.deployment.as_ref()?.vms.get(index)?.reservation?;
    match &loaded.system.resources.get(r)?.kind {
        rtc::system::ResourceKind::Reservation { budget, period, .. } => {
            let runtime_us = budget.ceil().to_f64() as u64;
            let period_us = period.floor().to_f64() as u64;
            (runtime_us > 0 && runtime_us <= period_us).then_some(agent::realtime::Reservation { runtime_us, period_us })
        }
        _ => None,
    }
}

fn h_or(h: &Option<String>) -> &str {
    h.as_deref().unwrap_or("")
}

impl Layout {
    /// The CPUs for `processors` (of `host`): on the embedded cluster every host shares this
    /// machine, so each model processor gets its own CPU (its position among all the hosts'
    /// processors) — when the machine has that many; otherwise nothing is pinned (pinning
    /// several hosts' VMs to one CPU would only make them compete).
    fn cpus_of(&self, loaded: &Loaded, host: &str, processors: &[String]) -> Vec<usize> {
        let Some(dep) = &loaded.deployment else { return Vec::new() };
        if dep.hosts.iter().all(|h| h.name != host) {
            return Vec::new();
        }
        let all: Vec<usize> = dep.hosts.iter().flat_map(|h| h.processors.iter().copied()).collect();
        if all.len() > self.cpus {
            return Vec::new();
        }
        let mut cpus: Vec<usize> =
            processors.iter().filter_map(|p| all.iter().position(|&r| loaded.system.resources[r].name == *p)).collect();
        cpus.sort();
        cpus.dedup();
        cpus
    }
}

/// Where every VM runs as the model describes it (no failure).
pub fn initial_targets(loaded: &Loaded) -> Vec<Target> {
    let Some(dep) = &loaded.deployment else { return Vec::new() };
    dep.vms
        .iter()
        .map(|v| Target {
            vm: v.name.clone(),
            host: v.instances.first().and_then(|&p| dep.host_of_processor(p)).map(|h| dep.hosts[h].name.clone()),
            backup: v.backup.map(|h| dep.hosts[h].name.clone()),
            processors: v.instances.iter().map(|&p| loaded.system.resources[p].name.clone()).collect(),
        })
        .collect()
}

/// What cannot run: a VM whose image is missing (named with the file and line of its item).
pub fn check_images(loaded: &Loaded, layout: &Layout) -> Result<(), String> {
    for r in &loaded.runs {
        let p = layout.image(r);
        if !p.is_file() {
            return Err(format!("{}:{}: run {:?}: image {} not found", loaded.file, r.line, r.vm, p.display()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Layout {
        Layout {
            host_ip: [("hostA", 1), ("hostB", 2), ("hostC", 3)].iter().map(|(h, i)| (h.to_string(), Ipv4Addr::new(10, 0, 0, *i))).collect(),
            arbiter: "10.0.0.254:7000".into(),
            key_file: "k".into(),
            bridge: "br".into(),
            images: BTreeMap::new(),
            run_dir: "/tmp".into(),
            timing: TimingSpec::default(),
            cpus: 1,
            analysed: BTreeMap::new(),
            migration: Migration::PreCopy,
        }
    }

    #[test]
    fn an_analysed_policy_is_the_longest_interval_that_keeps_the_deadlines() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/substation.toml");
        let text = std::fs::read_to_string(path).unwrap().replacen("policy = \"adaptive\"", "policy = \"analysed\"", 1);
        let loaded = model::parse(&text, "substation.toml", std::path::Path::new(".")).unwrap();
        let mut layout = layout();
        let notes = layout.analyse_policies(&loaded);
        assert_eq!(notes.len(), 1, "{notes:?}");
        // (fixed:3.48: the example's 3 ms of staging and acknowledgement make a longer
        // interval's hold too long for the protection chain.)
        assert!(notes[0].starts_with("relay: analysed checkpoint policy fixed:3.48 "), "{notes:?}");
        let relay = loaded.runs.iter().find(|r| r.vm == "relay").unwrap();
        assert_eq!(layout.policy(relay).to_string(), "fixed:3.48");
        // The other VMs keep theirs (control: the default).
        let control = loaded.runs.iter().find(|r| r.vm == "control").unwrap();
        assert_eq!(layout.policy(control), replication::PolicySpec::default());
    }

    /// examples/crowded.toml with its cache replicated to hostA (`tests/cluster.rs` runs it).
    pub(crate) fn crowded_replicated() -> Loaded {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/crowded.toml");
        let cache = "memory = \"64MiB\"\n[[vm]]\nname = \"logger\"";
        let text = std::fs::read_to_string(path).unwrap();
        assert!(text.contains(cache), "examples/crowded.toml changed");
        let replicated = "memory = \"64MiB\"\nmode = \"remote\"\nbackup = \"hostA\"\ncheckpoint_size = \"1MiB\"\n\
             checkpoint_interval = \"50ms\"\ncheckpoint_priority = 21\n[[vm]]\nname = \"logger\"";
        model::parse(&text.replacen(cache, replicated, 1), "crowded.toml", std::path::Path::new(".")).unwrap()
    }

    /// The desired records after `failed` failed, from the records of the initial placement.
    fn after(loaded: &Loaded, failed: &str) -> (BTreeMap<String, Desired>, Vec<String>) {
        let layout = layout();
        let table = Table::compute(loaded, &[], 1, 1).unwrap();
        let (initial, deviations) = layout.desired(loaded, &initial_targets(loaded), &[], &table, 1, &BTreeMap::new());
        assert!(deviations.is_empty(), "{deviations:?}");
        let failed = vec![failed.to_string()];
        let plan = table.lookup(&failed).unwrap();
        layout.desired(loaded, &plan.targets, &failed, &table, 2, &initial)
    }

    #[test]
    fn a_replicated_vm_the_plan_moves_off_a_live_host_migrates_and_is_protected_where_the_plan_says() {
        let loaded = crowded_replicated();
        // hostA fails: the cache loses its backup, and the plan moves it from hostB to hostC
        // (to make room for the relay) with a new backup on hostB.
        let (d, deviations) = after(&loaded, "hostA");
        assert!(deviations.is_empty(), "{deviations:?}");
        let cache = &d["cache"];
        let p = cache.primary.as_ref().unwrap();
        assert_eq!(p.host, "hostB", "it runs on where its state is until the handover");
        let to = p.migrate_to.as_ref().expect("a pre-copy migration");
        assert_eq!((to.host.as_str(), to.protection.backup.as_str()), ("hostC", "10.0.0.3:7101"));
        let b = cache.backup.as_ref().unwrap();
        assert_eq!(b.host, "hostC", "the destination is its backup meanwhile");
        assert_eq!(b.spec.then_protect.as_deref(), Some("10.0.0.2:7101"), "then protected to hostB, as the plan says");
    }

    #[test]
    fn a_replicated_vm_activated_away_from_its_replica_runs_there_first_and_migrates_on() {
        let loaded = crowded_replicated();
        // hostB fails: the cache's replica is on hostA, the plan activates it on hostC.
        let (d, deviations) = after(&loaded, "hostB");
        assert!(deviations.is_empty(), "{deviations:?}");
        let cache = &d["cache"];
        let p = cache.primary.as_ref().unwrap();
        assert_eq!(p.host, "hostA", "its backup took over there");
        assert!(!p.restart, "a replicated VM's state is not restarted afresh");
        assert_eq!(p.migrate_to.as_ref().map(|m| m.host.as_str()), Some("hostC"));
        let b = cache.backup.as_ref().unwrap();
        assert_eq!((b.host.as_str(), b.spec.then_protect.as_deref()), ("hostC", Some("10.0.0.1:7101")));
        // The same records again from those (a new leader re-executing the plan).
        let layout = layout();
        let table = Table::compute(&loaded, &[], 1, 1).unwrap();
        let failed = vec!["hostB".to_string()];
        let (again, _) = layout.desired(&loaded, &table.lookup(&failed).unwrap().targets, &failed, &table, 2, &d);
        assert_eq!(again["cache"].primary.as_ref().unwrap().host, "hostA");
        assert_eq!(again["cache"].primary.as_ref().unwrap().migrate_to.as_ref().unwrap().host, "hostC");
    }
}
