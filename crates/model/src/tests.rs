//! Validation rules: each test breaks one rule of a valid file and checks that the message
//! names the file, the line and the item.

use super::*;
use rtc::system::{Input, Policy, ResourceKind};
use rtc::Q;

const BASE: &str = r#"[[processor]]
name = "cpu0"

[[processor]]
name = "cpu1"

[[link]]
name = "eth0"
bandwidth = "100Mbit/s"

[[vm]]
name = "vm1"
host = "cpu1"
budget = "2ms"
period = "10ms"

[[stream]]
name = "sensor"
model = "periodic"
period = "10ms"

[[task]]
name = "filter"
on = "cpu0"
input = "sensor"
wcet = "1ms"
priority = 1

[[task]]
name = "send"
on = "eth0"
input = "filter"
size = "1500B"

[[task]]
name = "control"
on = "vm1"
input = "send"
wcet = "1ms"
priority = 1

[[chain]]
name = "loop"
tasks = ["filter", "send", "control"]
deadline = "20ms"
"#;

fn q(s: &str) -> Q {
    s.parse().unwrap()
}

fn ok(text: &str) -> Loaded {
    match parse(text, "t.toml", Path::new(".")) {
        Ok(l) => l,
        Err(e) => panic!("expected success, got: {e}"),
    }
}

/// Parses `text`, expects an error at `line` that names `name` and contains `fragment`.
fn fails(text: &str, line: usize, name: &str, fragment: &str) -> ModelError {
    let e = match parse(text, "t.toml", Path::new(".")) {
        Ok(_) => panic!("expected an error containing {fragment:?}"),
        Err(e) => e,
    };
    let msg = e.to_string();
    assert!(msg.starts_with(&format!("t.toml:{line}: ")), "wrong line in: {msg}");
    assert!(msg.contains(&format!("{name:?}")) || name.is_empty(), "item {name:?} not named in: {msg}");
    assert!(msg.contains(fragment), "{fragment:?} not in: {msg}");
    assert!(!msg.contains('\n'), "not one line: {msg}");
    e
}

fn with(from: &str, to: &str) -> String {
    assert!(BASE.contains(from), "{from:?} not in BASE");
    BASE.replacen(from, to, 1)
}

#[test]
fn base_maps_onto_the_system() {
    let l = ok(BASE);
    let s = &l.system;
    assert_eq!(s.resources.len(), 4);
    assert_eq!(s.resources[0].kind, ResourceKind::Dedicated { rate: q("1") });
    assert_eq!(s.resources[2].kind, ResourceKind::Dedicated { rate: q("25/2") });
    assert_eq!(s.resources[2].policy, Policy::Fifo);
    assert!(
        matches!(&s.resources[3].kind, ResourceKind::Reservation { host: 1, budget, period, supply: rtc::models::SupplyModel::WorstCase } if budget == &q("2000") && period == &q("10000"))
    );
    assert_eq!(
        l.resources.iter().map(|i| i.kind).collect::<Vec<_>>(),
        [ItemKind::Processor, ItemKind::Processor, ItemKind::Link, ItemKind::Vm]
    );
    assert_eq!(l.resources[3].line, 11);
    assert_eq!(s.tasks.len(), 3);
    assert_eq!(s.tasks[0].bcet, q("0"), "bcet defaults to 0");
    assert_eq!(s.tasks[1].wcet, q("1500"));
    assert_eq!(s.tasks[1].input, Input::Task(0));
    assert_eq!(l.tasks[2].line, 35);
    assert_eq!(l.work_unit(1), "B");
    assert_eq!(s.chains[0].tasks, vec![0, 1, 2]);
    assert_eq!(s.chains[0].deadline, Some(q("20000")));
}

#[test]
fn vm_as_a_task() {
    // With a reservation: an inner task named like the VM.
    let l = ok(&with(
        "period = \"10ms\"\n\n[[stream]]",
        "period = \"10ms\"\ninput = \"sensor\"\nwcet = \"1ms\"\nbcet = \"0.5ms\"\npriority = 2\ndeadline = \"10ms\"\n\n[[stream]]",
    ));
    let t = l.system.tasks.iter().position(|t| t.name == "vm1").unwrap();
    assert_eq!(l.system.tasks[t].resource, 3);
    assert_eq!(l.tasks[t].kind, ItemKind::Vm);
    assert_eq!(l.system.tasks[t].bcet, q("500"));
    // Without a reservation: a task on the host.
    let l =
        ok(&with("[[stream]]", "[[vm]]\nname = \"vm2\"\nhost = \"cpu0\"\ninput = \"sensor\"\nwcet = \"1ms\"\npriority = 5\n\n[[stream]]"));
    let t = l.system.tasks.iter().position(|t| t.name == "vm2").unwrap();
    assert_eq!(l.system.tasks[t].resource, 0);
}

#[test]
fn syntax_error_has_a_line() {
    fails(
        &with("wcet = \"1ms\"\npriority = 1\n\n[[task]]\nname = \"send\"", "wcet = \"1ms\"\npriority = = 1\n\n[[task]]\nname = \"send\""),
        27,
        "",
        "",
    );
    let e = fails("[[processor]]\nname = \"a\"\nname = \"b\"\n", 3, "", "duplicate");
    assert!(matches!(e, ModelError::Syntax { .. }));
}

#[test]
fn unknown_keys() {
    fails(
        &with("wcet = \"1ms\"\npriority = 1\n\n[[task]]\nname = \"send\"", "wcet = \"1ms\"\nprio = 1\n\n[[task]]\nname = \"send\""),
        27,
        "filter",
        "task \"filter\": unknown field `prio`",
    );
    fails(&with("name = \"send\"\n", ""), 29, "", "task: missing field `name`");
    fails(&format!("{BASE}\n[[proccessor]]\nname = \"x\"\n"), 47, "", "unknown field `proccessor`");
}

#[test]
fn duplicate_names_across_kinds() {
    fails(&with("name = \"send\"", "name = \"sensor\""), 30, "sensor", "duplicate name: stream \"sensor\" at line 17");
    fails(&with("name = \"cpu1\"", "name = \"cpu0\""), 5, "cpu0", "duplicate name");
}

#[test]
fn bad_names() {
    fails(&with("name = \"filter\"", "name = \"../etc\""), 23, "../etc", "a name must be");
}

#[test]
fn unknown_references() {
    fails(&with("on = \"cpu0\"", "on = \"cpu9\""), 24, "filter", "unknown resource \"cpu9\"");
    fails(&with("on = \"cpu0\"", "on = \"sensor\""), 24, "filter", "is a stream, not a processor");
    fails(&with("input = \"sensor\"", "input = \"sensr\""), 25, "filter", "unknown input \"sensr\"");
    fails(&with("input = \"sensor\"", "input = \"cpu0\""), 25, "filter", "is a processor, not a stream or task");
    fails(&with("host = \"cpu1\"", "host = \"cpu7\""), 13, "vm1", "unknown host \"cpu7\"");
    fails(&with("host = \"cpu1\"", "host = \"eth0\""), 13, "vm1", "is a link, not a processor");
    fails(&with("on = \"cpu0\"\n", ""), 22, "filter", "missing `on`");
    fails(&with("input = \"sensor\"\n", ""), 22, "filter", "missing `input`");
}

#[test]
fn input_cycle() {
    fails(&with("input = \"sensor\"", "input = \"control\""), 25, "filter", "input cycle: filter → send → control → filter");
    fails(&with("input = \"sensor\"", "input = \"filter\""), 25, "filter", "input cycle: filter → filter");
}

#[test]
fn chains() {
    fails(
        &with("tasks = [\"filter\", \"send\", \"control\"]", "tasks = [\"filter\", \"control\"]"),
        44,
        "loop",
        "\"control\" does not follow \"filter\": its input is \"send\"",
    );
    fails(&with("tasks = [\"filter\", \"send\", \"control\"]", "tasks = [\"filter\", \"send\", \"filter\"]"), 44, "loop", "appears twice");
    fails(&with("tasks = [\"filter\", \"send\", \"control\"]", "tasks = [\"filter\", \"snd\"]"), 44, "loop", "unknown task \"snd\"");
    fails(&with("tasks = [\"filter\", \"send\", \"control\"]", "tasks = []"), 44, "loop", "empty");
    fails(&with("deadline = \"20ms\"", "deadline = \"0ms\""), 45, "loop", "must be positive");
}

#[test]
fn demands() {
    fails(
        &with("wcet = \"1ms\"\npriority = 1\n\n[[task]]\nname = \"send\"", "priority = 1\n\n[[task]]\nname = \"send\""),
        22,
        "filter",
        "missing `wcet`",
    );
    fails(&with("wcet = \"1ms\"", "wcet = \"1ms\"\nbcet = \"2ms\""), 27, "filter", "bcet \"2ms\" exceeds wcet \"1ms\"");
    fails(&with("wcet = \"1ms\"", "wcet = \"0ms\""), 26, "filter", "`wcet` must be positive");
    fails(&with("wcet = \"1ms\"", "wcet = \"-1ms\""), 26, "filter", "`wcet` must be positive");
    fails(&with("wcet = \"1ms\"", "wcet = 1"), 26, "filter", "needs a unit");
    fails(&with("wcet = \"1ms\"", "wcet = \"10 parsecs\""), 26, "filter", "unknown time unit \"parsecs\"");
    fails(&with("size = \"1500B\"", "wcet = \"1ms\""), 33, "send", "not `wcet`/`bcet`");
    fails(&with("size = \"1500B\"", "size = \"1500B\"\nmin_size = \"2kB\""), 34, "send", "`min_size` exceeds `size`");
    fails(&with("size = \"1500B\"", "size = \"15 stones\""), 33, "send", "unknown size unit");
    fails(&with("size = \"1500B\"\n", ""), 29, "send", "missing `size`");
    fails(&with("wcet = \"1ms\"", "wcet = \"1ms\"\nsize = \"1B\""), 27, "filter", "apply to tasks on links");
}

#[test]
fn periods_and_budgets() {
    fails(&with("period = \"10ms\"\n\n[[task]]", "period = \"0ms\"\n\n[[task]]"), 20, "sensor", "`period` must be positive");
    fails(&with("period = \"10ms\"\n\n[[task]]", "period = \"-5ms\"\n\n[[task]]"), 20, "sensor", "`period` must be positive");
    fails(&with("budget = \"2ms\"", "budget = \"0ms\""), 14, "vm1", "`budget` must be positive");
    fails(&with("budget = \"2ms\"", "budget = \"12ms\""), 14, "vm1", "budget \"12ms\" exceeds the period \"10ms\"");
    fails(&with("budget = \"2ms\"\n", ""), 14, "vm1", "`period` needs a `budget`");
    fails(&with("period = \"10ms\"\n\n[[stream]]", "\n[[stream]]"), 14, "vm1", "`budget` needs a `period`");
    fails(&with("bandwidth = \"100Mbit/s\"", "bandwidth = \"0Mbit/s\""), 9, "eth0", "`bandwidth` must be positive");
    fails(&with("bandwidth = \"100Mbit/s\"", "bandwidth = \"100 parsecs/s\""), 9, "eth0", "unknown bandwidth unit");
}

#[test]
fn stream_models() {
    let pjd = |extra: &str| with("model = \"periodic\"", &format!("model = \"pjd\"\n{extra}"));
    let l = ok(&pjd("jitter = \"1ms\"\nmin_distance = \"1ms\""));
    assert!(matches!(&l.system.streams[0].model, rtc::models::EventModel::Pjd { jitter, .. } if jitter == &q("1000")));
    fails(&pjd("jitter = \"-1ms\""), 20, "sensor", "`jitter` must not be negative");
    fails(
        &with("period = \"10ms\"\n\n[[task]]", "period = \"10ms\"\njitter = \"1ms\"\n\n[[task]]"),
        21,
        "sensor",
        "`jitter` does not apply to a periodic stream",
    );
    fails(&with("model = \"periodic\"", "model = \"poisson\""), 19, "sensor", "unknown model \"poisson\"");
    fails(&with("model = \"periodic\"", "model = \"bursty\""), 17, "sensor", "missing `burst`");
    fails(&with("model = \"periodic\"", "model = \"bursty\"\nburst = 0"), 20, "sensor", "`burst` must be in");
    ok(&with("model = \"periodic\"", "model = \"bursty\"\nburst = 3"));
    fails(&with("model = \"periodic\"\nperiod = \"10ms\"", "model = \"sporadic\""), 17, "sensor", "missing `min_distance`");
    ok(&with("model = \"periodic\"\nperiod = \"10ms\"", "model = \"sporadic\"\nmin_distance = \"10ms\""));
    let trace = |t: &str| with("model = \"periodic\"\nperiod = \"10ms\"", &format!("model = \"trace\"\n{t}"));
    let l = ok(&trace("times = [\"0ms\", \"9.5ms\", \"20ms\", \"30ms\", \"41ms\"]"));
    assert!(
        matches!(&l.system.streams[0].model, rtc::models::EventModel::Trace { times, window: None } if times.len() == 5 && times[1] == q("9500"))
    );
    fails(&trace("times = [\"0ms\", \"20ms\", \"10ms\"]"), 17, "sensor", "must not decrease");
    fails(&trace("times = [\"0ms\", \"20 fortnights\"]"), 20, "sensor", "unknown time unit");
    fails(&trace("file = \"no-such-trace.txt\""), 20, "sensor", "trace file \"no-such-trace.txt\"");
    fails(&trace(""), 17, "sensor", "missing `times` or `file`");
}

#[test]
fn trace_file_is_read_relative_to_base_dir() {
    let dir = std::env::temp_dir().join(format!("model-trace-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("t.txt"), "# arrivals\n0ms\n10ms\n\n19ms # late\n30ms\n").unwrap();
    let text = with("model = \"periodic\"\nperiod = \"10ms\"", "model = \"trace\"\nfile = \"t.txt\"");
    let l = parse(&text, "t.toml", &dir).unwrap();
    assert!(matches!(&l.system.streams[0].model, rtc::models::EventModel::Trace { times, .. } if times.len() == 4));
    std::fs::write(dir.join("t.txt"), "0ms\nbogus\n").unwrap();
    let e = parse(&text, "t.toml", &dir).unwrap_err().to_string();
    assert!(e.starts_with("t.toml:20: stream \"sensor\": trace file \"t.txt\": line 2:"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn priorities() {
    fails(
        &with("priority = 1\n\n[[task]]\nname = \"send\"", "\n[[task]]\nname = \"send\""),
        22,
        "filter",
        "missing `priority` (required on processor \"cpu0\" with policy fp)",
    );
    let two = with("[[chain]]", "[[task]]\nname = \"other\"\non = \"cpu0\"\ninput = \"sensor\"\nwcet = \"1ms\"\npriority = 1\n\n[[chain]]");
    fails(&two, 47, "other", "priority 1 is also used by task \"filter\" on processor \"cpu0\"");
    // Links default to fifo: no priority needed.
    ok(BASE);
}

#[test]
fn edf_needs_deadlines() {
    let text = with("name = \"cpu0\"", "name = \"cpu0\"\npolicy = \"edf\"");
    fails(&text, 23, "filter", "missing `deadline` (required on processor \"cpu0\" with policy edf)");
    ok(&text.replacen("priority = 1", "deadline = \"5ms\"", 1));
    fails(&with("bandwidth", "policy = \"edf\"\nbandwidth"), 9, "eth0", "edf is not available on links");
    fails(&with("name = \"cpu0\"", "name = \"cpu0\"\npolicy = \"rr\""), 3, "cpu0", "unknown policy \"rr\"");
}

#[test]
fn tdma() {
    let text = with("name = \"cpu0\"", "name = \"cpu0\"\npolicy = \"tdma\"\ncycle = \"4ms\"");
    fails(&text, 24, "filter", "missing `slot`");
    ok(&text.replacen("priority = 1", "slot = \"2ms\"", 1));
    fails(&text.replacen("priority = 1", "slot = \"5ms\"", 1), 4, "cpu0", "slots of its tasks add up to 5 ms, more than the cycle 4 ms");
    fails(&with("name = \"cpu0\"", "name = \"cpu0\"\npolicy = \"tdma\""), 3, "cpu0", "policy tdma needs a `cycle`");
    fails(&with("name = \"cpu0\"", "name = \"cpu0\"\ncycle = \"4ms\""), 3, "cpu0", "`cycle` applies only to policy tdma");
    fails(
        &with("priority = 1\n\n[[task]]\nname = \"send\"", "priority = 1\nslot = \"1ms\"\n\n[[task]]\nname = \"send\""),
        28,
        "filter",
        "`slot` applies only to tdma",
    );
}

#[test]
fn vm_rules() {
    fails(&with("on = \"cpu0\"", "on = \"cpu1\""), 24, "filter", "hosts VM reservations");
    fails(&with("budget = \"2ms\"\nperiod = \"10ms\"\n", ""), 11, "vm1", "a VM needs a reservation");
    fails(&with("host = \"cpu1\"\n", ""), 11, "vm1", "missing `host`");
    fails(&with("host = \"cpu1\"", "host = \"cpu1\"\nsupply = \"lucky\""), 14, "vm1", "unknown supply model");
    let l = ok(&with("host = \"cpu1\"", "host = \"cpu1\"\nsupply = \"synchronous\""));
    assert!(matches!(l.system.resources[3].kind, ResourceKind::Reservation { supply: rtc::models::SupplyModel::Synchronous, .. }));
    fails(&with("name = \"cpu1\"", "name = \"cpu1\"\nspeed = 2"), 4, "cpu1", "must have speed 1");
}

#[test]
fn overload() {
    // 11 ms of work every 10 ms.
    let e = fails(&with("wcet = \"1ms\"", "wcet = \"11ms\""), 1, "cpu0", "overloaded: long-run utilisation is 110.0%");
    assert!(matches!(e, ModelError::Overload { .. }));
    // Inside a reservation: 3 ms per 10 ms against 2 ms per 10 ms.
    fails(
        &with("wcet = \"1ms\"\npriority = 1\n\n[[chain]]", "wcet = \"3ms\"\npriority = 1\n\n[[chain]]"),
        11,
        "vm1",
        "150.0% (more than 100%) of its reservation",
    );
    // Host: two VMs with half and 60%.
    let text = with("[[stream]]", "[[vm]]\nname = \"vm2\"\nhost = \"cpu1\"\nbudget = \"6ms\"\nperiod = \"10ms\"\n\n[[stream]]");
    fails(&text.replacen("budget = \"2ms\"", "budget = \"5ms\"", 1), 4, "cpu1", "110.0%");
    // Link: 1500 B every 10 µs on 12.5 B/µs.
    fails(&with("period = \"10ms\"\n\n[[task]]", "period = \"10us\"\n\n[[task]]"), 1, "cpu0", "overloaded");
}

#[test]
fn absurd_sizes() {
    fails(&with("period = \"10ms\"\n\n[[task]]", "period = \"5000000000s\"\n\n[[task]]"), 20, "sensor", "too large");
    let speed = with("name = \"cpu0\"", "name = \"cpu0\"\nspeed = 1e300");
    fails(&speed, 3, "cpu0", "`speed` must be in");
    let mut many = String::new();
    for i in 0..=MAX_ITEMS {
        many.push_str(&format!("[[processor]]\nname = \"p{i}\"\n"));
    }
    let e = parse(&many, "t.toml", Path::new(".")).unwrap_err().to_string();
    assert!(e.contains("at most 100000"), "{e}");
}

#[test]
fn locate_points_at_the_item() {
    let l = ok(BASE);
    let e = l.locate(&rtc::system::AnalysisError::Task { task: "send".into(), msg: "boom".into() });
    assert_eq!(e.to_string(), "t.toml:29: task \"send\": cannot be analysed: boom");
    let e = l.locate(&rtc::system::AnalysisError::Resource { resource: "vm1".into(), msg: "x".into() });
    assert!(e.to_string().starts_with("t.toml:11: vm \"vm1\""));
}

#[test]
fn load_reports_io_errors_and_uses_the_path() {
    let e = load("/no/such/dir/system.toml").unwrap_err().to_string();
    assert!(e.starts_with("/no/such/dir/system.toml: cannot read"), "{e}");
}

#[test]
fn the_documented_example_is_valid() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/model-format.md")).unwrap();
    // The whole example: the TOML block with chains (others show one item kind).
    let example = doc
        .split("```toml\n")
        .skip(1)
        .map(|b| &b[..b.find("```").expect("a block's end")])
        .find(|b| b.contains("[[chain]]"))
        .expect("the whole example");
    let l = ok(example);
    assert_eq!(l.system.tasks.len(), 5);
    assert_eq!(l.system.chains[0].tasks.len(), 4);
}

#[test]
fn workload_curves() {
    let l = ok(&with("wcet = \"1ms\"", "wcet = \"1ms\"\nworkload_upper = [\"1ms\", \"1.5ms\", \"2ms\"]"));
    let t = l.system.tasks.iter().find(|t| t.name == "filter").expect("filter");
    let w = t.workload.as_ref().expect("workload curves");
    assert_eq!(w.upper, vec![q("1000"), q("1500"), q("2000")]);
    assert_eq!(w.lower, vec![q("0")]);
    fails(&with("wcet = \"1ms\"", "wcet = \"1ms\"\nworkload_upper = [\"2ms\"]"), 27, "filter", "must start with the WCET");
    fails(&with("wcet = \"1ms\"", "wcet = \"1ms\"\nworkload_upper = [\"1ms\", \"0.5ms\"]"), 27, "filter", "decreases at 2 activations");
    fails(&with("wcet = \"1ms\"", "wcet = \"1ms\"\nworkload_upper = [\"1ms\", \"3ms\"]"), 27, "filter", "beyond 2 × 1000");
    fails(&with("size = \"1500B\"", "size = \"1500B\"\nworkload_upper = [\"1ms\"]"), 34, "send", "processors or VMs");
}

// ------------------------------------------------------------------ hosts and deployment

const CLUSTER: &str = include_str!("../../../examples/cluster.toml");

fn cluster_with(from: &str, to: &str) -> String {
    assert!(CLUSTER.contains(from), "{from:?} not in examples/cluster.toml");
    CLUSTER.replacen(from, to, 1)
}

/// 1-based line of the first occurrence of `needle` in `text`.
fn line_of(text: &str, needle: &str) -> usize {
    let at = text.find(needle).unwrap_or_else(|| panic!("{needle:?} not in text"));
    1 + text[..at].matches('\n').count()
}

#[test]
fn the_cluster_example_maps_onto_a_deployment() {
    let l = ok(CLUSTER);
    let d = l.deployment.as_ref().expect("hosts");
    assert_eq!(d.hosts.len(), 3);
    assert_eq!(d.vms.len(), 4);
    let relay = &d.vms[0];
    assert_eq!((relay.mode, relay.criticality), (Mode::Remote, 3));
    assert_eq!(d.hosts[relay.backup.expect("backup")].name, "hostB");
    assert_eq!(relay.memory, q("2147483648"));
    // The checkpoint stream is a message on the primary's port, competing with its traffic.
    let cp = relay.checkpoint.as_ref().expect("checkpoints");
    let t = &l.system.tasks[cp.task];
    assert_eq!((t.name.as_str(), l.system.resources[t.resource].name.as_str()), ("relay.checkpoint", "portA"));
    assert_eq!(t.wcet, q("2097152"));
    // The voter's second instance is a reservation of its own on c1.
    let voter = &d.vms[2];
    assert_eq!((voter.mode, voter.instances.len(), voter.extra_reservations.len()), (Mode::Local, 2, 1));
    // Messages between hosts leave on the sender's port; the planner re-routes them.
    assert_eq!(d.messages.len(), 2);
    let trip = l.system.tasks.iter().position(|t| t.name == "trip").expect("trip");
    assert_eq!(l.system.resources[l.system.tasks[trip].resource].name, "portA");
    // Moving the voter next to the relay makes "trip" local: it goes over hostA's loopback.
    let mut place = d.initial();
    let a0 = l.system.resources.iter().position(|r| r.name == "a1").expect("a1");
    place.vms[2].instances = vec![a0, a0];
    let mut sys = l.system.clone();
    d.apply(&l.system, &place, &mut sys);
    assert_eq!(sys.resources[sys.tasks[trip].resource].name, "hostA.loopback");
    // Stopping the relay stops its work and its checkpoints.
    place.vms[0].instances.clear();
    d.apply(&l.system, &place, &mut sys);
    assert!(sys.tasks[cp.task].wcet.is_zero());
    assert!(sys.tasks[l.system.tasks.iter().position(|t| t.name == "protect").expect("protect")].wcet.is_zero());
}

#[test]
fn anti_affinity_is_parsed_symmetric_and_checked() {
    // relay (hostA) apart from control (hostB): kept both ways.
    let t = cluster_with("name = \"relay\"\nhost = \"a0\"", "name = \"relay\"\nhost = \"a0\"\napart = [\"control\"]");
    let l = crate::parse(&t, "cluster.toml", std::path::Path::new(".")).unwrap();
    let d = l.deployment.as_ref().unwrap();
    let (relay, control) = (d.vms.iter().position(|v| v.name == "relay").unwrap(), d.vms.iter().position(|v| v.name == "control").unwrap());
    assert_eq!(d.vms[relay].apart, vec![control]);
    assert_eq!(d.vms[control].apart, vec![relay]);
    assert_eq!(d.apart_violation(&d.initial()), None);
    // Moving control onto relay's host breaks it; the check names both.
    let mut place = d.initial();
    place.vms[control].instances = vec![d.vms[relay].instances[0]];
    assert_eq!(d.apart_violation(&place), Some((relay, control, 0)));
    // Errors: unknown VM, itself, and a placement as written that shares a host.
    let apart = |list: &str| cluster_with("name = \"relay\"\nhost = \"a0\"", &format!("name = \"relay\"\nhost = \"a0\"\napart = {list}"));
    let t = apart("[\"ghost\"]");
    fails(&t, line_of(&t, "apart = "), "relay", "unknown VM \"ghost\"");
    let t = apart("[\"relay\"]");
    fails(&t, line_of(&t, "apart = "), "relay", "cannot be kept apart from itself");
    let t = apart("[\"logger\"]");
    fails(&t, line_of(&t, "apart = "), "relay", "must never share a host with VM \"logger\" (`apart`), but both run on host \"hostA\"");
}

#[test]
fn deployment_errors_name_the_item_and_line() {
    // A remote backup on the VM's own host.
    let t = cluster_with("backup = \"hostB\"", "backup = \"hostA\"");
    fails(&t, line_of(&t, "backup = \"hostA\""), "relay", "a remote backup must be on another host");
    // An instance on an unknown processor, or on a processor of no host.
    let t = cluster_with("host = \"a0\"", "host = \"z9\"");
    fails(&t, line_of(&t, "host = \"z9\""), "relay", "unknown host \"z9\"");
    let t = cluster_with("instances = [\"c0\", \"c1\"]", "instances = [\"c0\", \"q1\"]");
    fails(&t, line_of(&t, "instances = [\"c0\", \"q1\"]"), "voter", "unknown processor \"q1\"");
    let t = cluster_with("host = \"a0\"", "host = \"spare\"").replacen("[[link]]", "[[processor]]\nname = \"spare\"\n\n[[link]]", 1);
    fails(&t, line_of(&t, "host = \"spare\""), "relay", "belongs to no host");
    // Local instances on two hosts.
    let t = cluster_with("instances = [\"c0\", \"c1\"]", "instances = [\"c0\", \"b1\"]");
    fails(&t, line_of(&t, "instances = [\"c0\", \"b1\"]"), "voter", "of different hosts");
    // Memory over a host's capacity (instances and backups count).
    let t = cluster_with("memory = \"6GiB\"", "memory = \"15GiB\"");
    fails(&t, line_of(&t, "memory = \"16GiB\""), "hostA", "more than its memory 16 GiB");
    // Modes and their keys.
    let t = cluster_with("mode = \"local\"", "mode = \"normal\"");
    fails(&t, line_of(&t, "instances = [\"c0\", \"c1\"]"), "voter", "2 instances, but mode normal runs one");
    let t = cluster_with("mode = \"local\"", "mode = \"mirror\"");
    fails(&t, line_of(&t, "mode = \"mirror\""), "voter", "unknown mode \"mirror\"");
    let t = cluster_with("backup = \"hostC\"\n", "");
    fails(&t, line_of(&t, "mode = \"remote\"\ncriticality = 2"), "control", "needs a `backup` host");
    let t = cluster_with("name = \"logger\"\nhost = \"a1\"", "name = \"logger\"\nhost = \"a1\"\nbackup = \"hostB\"");
    fails(&t, line_of(&t, "backup = \"hostB\"\nbudget = \"4ms\""), "logger", "`backup` given, but mode normal keeps none");
    let t = cluster_with("checkpoint_size = \"2MiB\"\n", "");
    fails(&t, line_of(&t, "[[vm]]\nname = \"relay\""), "relay", "missing `checkpoint_size`");
    let t = cluster_with("checkpoint_priority = 20\n", "");
    fails(&t, line_of(&t, "[[vm]]\nname = \"relay\""), "relay", "missing `checkpoint_priority`");
    let t = cluster_with("criticality = 3", "criticality = -1");
    fails(&t, line_of(&t, "criticality = -1"), "relay", "`criticality` must be an integer");
    let t = cluster_with("memory = \"2GiB\"\n", "");
    fails(&t, line_of(&t, "[[vm]]\nname = \"relay\""), "relay", "missing `memory`");
    // Hosts and ports.
    let t = cluster_with("processors = [\"b0\", \"b1\"]", "processors = [\"b0\", \"a1\"]");
    fails(&t, line_of(&t, "processors = [\"b0\", \"a1\"]"), "hostB", "already belongs to host \"hostA\"");
    let t = cluster_with("name = \"portB\"\nhost = \"hostB\"", "name = \"portB\"\nhost = \"hostA\"");
    fails(&t, line_of(&t, "name = \"portB\"") + 1, "portB", "already has a port");
    let t = cluster_with("name = \"portC\"\nhost = \"hostC\"", "name = \"portC\"\nhost = \"hostD\"");
    fails(&t, line_of(&t, "host = \"hostD\""), "portC", "unknown host \"hostD\"");
    // A message on the port of a host its sender does not run on.
    let t = cluster_with("on = \"portA\"", "on = \"portB\"");
    fails(&t, line_of(&t, "on = \"portB\"\ninput = \"protect\""), "trip", "its sender \"protect\" runs on host \"hostA\"");
    // Messages on ports move between ports: their priorities must be unique across ports.
    let t = cluster_with("checkpoint_priority = 21", "checkpoint_priority = 2");
    fails(&t, line_of(&t, "[[vm]]\nname = \"control\""), "control", "unique across all ports");
    // A plain task directly on a host's processor.
    let t = cluster_with("on = \"logger\"", "on = \"b1\"");
    fails(&t, line_of(&t, "on = \"b1\""), "log", "only VMs run on a host's processors");
    // Deployment keys without hosts.
    fails(
        &with("budget = \"2ms\"", "budget = \"2ms\"\nmemory = \"1GiB\""),
        15,
        "vm1",
        "`memory` describes a deployment, which needs [[host]] items",
    );
}

/// `Deployment::apply` gives a system that depends only on the base system and the placement:
/// applying random placements one after another onto one scratch system always gives what
/// applying the last one to a fresh copy of the base gives (stopped VMs, messages of stopped
/// senders and checkpoint streams included). The planner reuses scratch systems on this.
#[test]
fn apply_depends_only_on_the_placement() {
    let l = crate::parse(CLUSTER, "cluster.toml", Path::new(".")).unwrap();
    let d = l.deployment.as_ref().unwrap();
    let base = &l.system;
    let mut rng = rtc::synthetic::Rng(17);
    let mut scratch = base.clone();
    for _ in 0..300 {
        let mut place = d.initial();
        for (v, vm) in d.vms.iter().enumerate() {
            if rng.below(3) == 0 {
                place.vms[v] = crate::VmPlace { instances: vec![], backup: None };
                continue;
            }
            let h = rng.below(d.hosts.len());
            let procs = &d.hosts[h].processors;
            place.vms[v].instances = (0..vm.instances.len()).map(|_| procs[rng.below(procs.len())]).collect();
            place.vms[v].backup = if vm.mode.remote() { Some((h + 1 + rng.below(d.hosts.len() - 1)) % d.hosts.len()) } else { None };
        }
        d.apply(base, &place, &mut scratch);
        let mut fresh = base.clone();
        d.apply(base, &place, &mut fresh);
        assert_eq!(scratch, fresh, "{place:?}");
    }
    d.apply(base, &d.initial(), &mut scratch);
    assert_eq!(&scratch, base);
}

/// A local-mode VM's `voting_delay`: a voter component after each of its tasks, inside every
/// chain through it, and a bound that grows by the voter's delay; the key only on mode local.
#[test]
fn voting_delay_is_a_component_of_the_chains() {
    let base = ok(CLUSTER);
    let t = cluster_with("mode = \"local\"\n", "mode = \"local\"\nvoting_delay = \"1ms\"\n");
    let voted = ok(&t);
    let sys = &voted.system;
    let vote = sys.tasks.iter().position(|x| x.name == "vote.vote").expect("the voter of task vote");
    let apply = sys.tasks.iter().position(|x| x.name == "apply.vote").expect("the voter of task apply");
    let voter = &sys.resources[sys.tasks[vote].resource];
    assert_eq!(voter.name, "voter.voter");
    assert!(matches!(&voter.kind, rtc::system::ResourceKind::BoundedDelay { latency, .. } if *latency == q("1000")));
    let protection = sys.chains.iter().find(|c| c.name == "protection").expect("chain");
    assert_eq!(protection.tasks.last(), Some(&vote), "the voted reply ends the chain");
    let regulation = sys.chains.iter().find(|c| c.name == "regulation").expect("chain");
    assert_eq!(regulation.tasks.last(), Some(&apply));
    let bound = |l: &Loaded, chain: &str| {
        let a = rtc::system::analyze(&l.system, &rtc::system::Options::default()).expect("analysis");
        let i = l.system.chains.iter().position(|c| c.name == chain).expect("chain");
        a.chains[i].worst.clone().expect("bounded")
    };
    let (before, after) = (bound(&base, "protection"), bound(&voted, "protection"));
    assert!(after >= &before + &q("1000"), "{before} + the voting delay <= {after}");
    // Only local redundancy votes.
    let t = cluster_with("name = \"logger\"\nhost = \"a1\"", "name = \"logger\"\nhost = \"a1\"\nvoting_delay = \"1ms\"");
    fails(&t, line_of(&t, "voting_delay"), "logger", "`voting_delay` applies only to local redundancy");
    let t = cluster_with("mode = \"local\"\n", "mode = \"local\"\nvoting_delay = \"-1ms\"\n");
    fails(&t, line_of(&t, "voting_delay"), "voter", "voting_delay");
}

#[test]
fn checkpoint_pauses_and_held_output_enter_the_analysis() {
    use rtc::system::{analyze, Options};
    let base = ok(CLUSTER);
    let l =
        ok(&cluster_with("checkpoint_priority = 20\n", "checkpoint_priority = 20\ncheckpoint_pause = \"1ms\"\noutput_commit = \"8ms\"\n"));
    let d = l.deployment.as_ref().unwrap();
    let relay = &d.vms[0];
    let cp = relay.checkpoint.as_ref().unwrap();
    assert_eq!((cp.pause.clone(), cp.commit.clone()), (Some(q("1000")), Some(q("8000"))));
    // The relay's reservation pauses 1 ms every 50 ms; its tasks whose output leaves it hold it.
    let r = relay.reservation.unwrap();
    assert_eq!(l.system.resources[r].blackout, Some(rtc::system::Blackout { pause: q("1000"), every: q("50000") }));
    assert!(!cp.held.is_empty());
    for &t in &cp.held {
        assert_eq!(l.system.tasks[t].hold, Some(q("8000")), "{}", l.system.tasks[t].name);
    }
    // Every chain through a held task is longer by at least the hold; nothing gets shorter.
    let (a, b) = (analyze(&l.system, &Options::default()).unwrap(), analyze(&base.system, &Options::default()).unwrap());
    let mut longer = 0;
    for (i, ch) in l.system.chains.iter().enumerate() {
        let (x, y) = (a.chains[i].worst.clone().unwrap(), b.chains[i].worst.clone().unwrap());
        assert!(x >= y, "{}: {x} < {y}", ch.name);
        if ch.tasks.iter().any(|t| cp.held.contains(t)) {
            assert!(x >= &y + &q("8000"), "{}: {x} vs {y}", ch.name);
            longer += 1;
        }
    }
    assert!(longer > 0);
    // Unprotected (no backup in the placement): no pause, no hold.
    let mut place = d.initial();
    place.vms[0].backup = None;
    let mut sys = l.system.clone();
    d.apply(&l.system, &place, &mut sys);
    assert_eq!(sys.resources[r].blackout, None);
    assert!(cp.held.iter().all(|&t| sys.tasks[t].hold.is_none()));
}

#[test]
fn bad_checkpoint_pauses_and_commits_are_explained() {
    let with = |extra: &str| cluster_with("checkpoint_priority = 20\n", &format!("checkpoint_priority = 20\n{extra}\n"));
    let t = with("checkpoint_pause = \"50ms\"");
    fails(&t, line_of(&t, "checkpoint_pause"), "relay", "must be shorter than `checkpoint_interval`");
    let t = with("checkpoint_pause = \"-1ms\"");
    fails(&t, line_of(&t, "checkpoint_pause"), "relay", "must not be negative");
    let t = with("output_commit = 5");
    fails(&t, line_of(&t, "output_commit"), "relay", "needs a unit");
    let t = cluster_with("name = \"logger\"\nhost = \"a1\"", "name = \"logger\"\nhost = \"a1\"\noutput_commit = \"2ms\"");
    fails(&t, line_of(&t, "output_commit"), "logger", "applies only to modes with a remote backup");
}

#[test]
fn the_longest_checkpoint_interval_that_keeps_every_deadline() {
    use crate::replication::largest_fixed_interval;
    use rtc::system::{analyze, Options};
    let example = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/substation.toml")).unwrap();
    // First without the example's `checkpoint_ack` (its effect is checked at the end).
    let text: String = example.lines().filter(|l| !l.starts_with("checkpoint_ack")).map(|l| format!("{l}\n")).collect();
    let l = ok(&text);
    // relay's protection chain (deadline 15 ms) leaves it: fixed:T adds T + pause + transfer.
    let c = largest_fixed_interval(&l, "relay", None).unwrap();
    let t = c.interval.clone().expect("some interval keeps the deadlines");
    assert!(t < q("15000"), "{t}");
    // Between the candidate below it and the one above, every interval on the grid of three
    // significant digits (10 µs steps below 10 ms) that is longer breaks a deadline: the search
    // found the longest (checked exhaustively).
    let above = crate::replication::CANDIDATES_US.iter().rev().map(|&u| q(&u.to_string())).find(|u| u > &t).unwrap();
    let below = crate::replication::CANDIDATES_US.iter().map(|&u| q(&u.to_string())).find(|u| u <= &t).unwrap();
    assert!(t >= below, "the search went below the candidate {below} µs: {t}");
    eprintln!("relay: {t} µs (candidates {below} and {above} µs)");
    let mut u = &t + &q("10");
    while u < above {
        assert!(
            !matches!(crate::replication::fixed_interval(&l, "relay", &u, None).unwrap(), Some((true, _))),
            "{u} µs keeps every deadline too, longer than the chosen {t} µs"
        );
        u = &u + &q("10");
    }
    // One step longer breaks a deadline; the chosen one keeps them all (checked here by hand:
    // the same rewrite, analysed once more).
    let next = &t + &q("10");
    let mut m = text.replace("checkpoint_interval = \"2500us\"", &format!("checkpoint_interval = \"{}us\"", next.to_f64()));
    let commit = c.commit.clone().unwrap();
    m = m.replacen("output_commit = \"7ms\"", &format!("output_commit = \"{}us\"", (&next + &(&commit - &t)).to_f64()), 1);
    let l2 = ok(&m);
    assert!(!analyze(&l2.system, &Options::default()).unwrap().all_deadlines_met(&l2.system), "{next} µs also keeps them");
    // control's regulation chain has 40 ms: a longer interval.
    let c2 = largest_fixed_interval(&l, "control", None).unwrap();
    assert!(c2.interval.clone().unwrap() > t, "{c2:?}");
    // A pause as long as the deadline leaves nothing; a VM without checkpoints is an error.
    assert_eq!(largest_fixed_interval(&l, "relay", Some(q("14000"))).unwrap().interval, None);
    assert!(largest_fixed_interval(&l, "logger", None).unwrap_err().contains("no remote backup"));
    assert!(largest_fixed_interval(&l, "ghost", None).unwrap_err().contains("no VM"));
    // The backup's staging and acknowledgement (`checkpoint_ack`) lengthen the hold by as much,
    // and can only shorten the interval.
    let acked = ok(&text.replacen("output_commit = \"7ms\"", "output_commit = \"7ms\"\ncheckpoint_ack = \"3ms\"", 1));
    let c3 = largest_fixed_interval(&acked, "relay", None).unwrap();
    match (c3.interval.clone(), c3.commit.clone()) {
        (Some(t3), Some(commit3)) if t3 == t => assert_eq!(commit3, &commit + &q("3000")),
        (Some(t3), _) => assert!(t3 < t, "{t3} after {t}"),
        (None, _) => {}
    }
}

#[test]
fn bad_checkpoint_acks_are_explained() {
    let with = |extra: &str| cluster_with("checkpoint_priority = 20\n", &format!("checkpoint_priority = 20\n{extra}\n"));
    let t = with("checkpoint_ack = \"-1ms\"");
    fails(&t, line_of(&t, "checkpoint_ack"), "relay", "must not be negative");
    let t = cluster_with("name = \"logger\"\nhost = \"a1\"", "name = \"logger\"\nhost = \"a1\"\ncheckpoint_ack = \"2ms\"");
    fails(&t, line_of(&t, "checkpoint_ack"), "logger", "applies only to modes with a remote backup");
}
