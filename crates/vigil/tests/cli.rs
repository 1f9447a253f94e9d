//! Runs the real `vigil` binary on the example files and on broken inputs, and checks exit
//! codes (0 deadlines hold, 1 a deadline is missed, 2 invalid input), `--json` and `--plot`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples").join(name)
}

fn vigil(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vigil")).args(args).output().expect("the vigil binary runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A scratch folder for this test, empty; removed when dropped.
struct Scratch(PathBuf);

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn scratch(test: &str) -> Scratch {
    let d = std::env::temp_dir().join(format!("vigil-cli-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("temp dir");
    Scratch(d)
}

/// Writes `body` to a file and runs `vigil analyze` on it.
fn analyze_text(test: &str, body: &str, extra: &[&str]) -> (Output, String) {
    let d = scratch(test);
    let f = d.join("system.toml");
    std::fs::write(&f, body).expect("write system.toml");
    let path = f.display().to_string();
    let mut args = vec!["analyze", path.as_str()];
    args.extend_from_slice(extra);
    (vigil(&args), path)
}

const VALID_HEAD: &str = "[[processor]]\nname = \"cpu0\"\n\n[[stream]]\nname = \"tick\"\nmodel = \"periodic\"\nperiod = \"10ms\"\n\n";

// ------------------------------------------------------------------ invalid input: exit 2

#[test]
fn unknown_resource_exits_2_with_file_and_line() {
    let body = format!("{VALID_HEAD}[[task]]\nname = \"filter\"\non = \"cpu9\"\ninput = \"tick\"\nwcet = \"1ms\"\npriority = 1\n");
    let (out, path) = analyze_text("unknown", &body, &[]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert_eq!(err.trim_end(), format!("{path}:11: task \"filter\": unknown resource \"cpu9\""));
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(out.stdout.is_empty());
}

#[test]
fn syntax_error_exits_2() {
    let (out, path) = analyze_text("syntax", "[[processor]]\nname = \"cpu0\nspeed = 1\n", &["--json"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).starts_with(&format!("{path}:2: ")), "{}", text(&out.stderr));
    assert!(out.stdout.is_empty(), "no JSON for invalid input");
}

#[test]
fn overload_exits_2_and_names_the_resource() {
    let body = format!("{VALID_HEAD}[[task]]\nname = \"hog\"\non = \"cpu0\"\ninput = \"tick\"\nwcet = \"12ms\"\npriority = 1\n");
    let (out, path) = analyze_text("overload", &body, &[]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(err.starts_with(&format!("{path}:1: processor \"cpu0\": overloaded: long-run utilisation is 120.0%")), "{err}");
}

#[test]
fn bad_units_exit_2() {
    let body = format!("{VALID_HEAD}[[task]]\nname = \"t\"\non = \"cpu0\"\ninput = \"tick\"\nwcet = \"10 parsecs\"\npriority = 1\n");
    let (out, path) = analyze_text("units", &body, &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).starts_with(&format!("{path}:13: task \"t\": `wcet`: \"10 parsecs\": unknown time unit")),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn missing_file_and_bad_usage_exit_2() {
    let out = vigil(&["analyze", "/no/such/system.toml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).starts_with("/no/such/system.toml: cannot read"));
    assert_eq!(vigil(&[]).status.code(), Some(2));
    assert_eq!(vigil(&["analyze"]).status.code(), Some(2));
    assert_eq!(vigil(&["frobnicate"]).status.code(), Some(2));
}

#[test]
fn every_example_is_valid_input() {
    // Whatever the analysis says, no example may be rejected by the model.
    for f in ["simple.toml", "control-loop.toml", "overload-miss.toml", "edf.toml", "tdma.toml", "trace.toml", "cluster.toml"] {
        if let Err(e) = model::load(example(f)) {
            panic!("{f}: {e}");
        }
    }
}

// ------------------------------------------------------------------ real analysis

#[test]

fn simple_meets_its_deadlines() {
    let out = vigil(&["analyze", &example("simple.toml").display().to_string()]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "stdout:\n{stdout}\nstderr:\n{}", text(&out.stderr));
    for t in ["sample", "control", "log", "cpu0", "all deadlines met"] {
        assert!(stdout.contains(t), "{t:?} missing from:\n{stdout}");
    }
    assert!(!stdout.contains("MISS"));
}

#[test]

fn every_schedulable_example_exits_0() {
    for f in ["simple.toml", "control-loop.toml", "edf.toml", "tdma.toml", "trace.toml", "cluster.toml"] {
        let out = vigil(&["analyze", &example(f).display().to_string()]);
        assert_eq!(out.status.code(), Some(0), "{f}:\n{}\n{}", text(&out.stdout), text(&out.stderr));
    }
}

#[test]

fn a_missed_deadline_exits_1() {
    let out = vigil(&["analyze", &example("overload-miss.toml").display().to_string()]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("MISS"), "{stdout}");
    assert!(stdout.contains("DEADLINES NOT MET"), "{stdout}");
}

#[test]

fn json_report_parses() {
    let out = vigil(&["analyze", &example("control-loop.toml").display().to_string(), "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stdout is JSON");
    assert_eq!(v["all_deadlines_met"], serde_json::Value::Bool(true));
    let chain = &v["chains"][0];
    assert_eq!(chain["name"], "loop");
    assert_eq!(chain["verdict"], "ok");
    assert!(chain["worst_us"].is_string() && chain["worst_ms"].is_f64());
    let tasks = v["tasks"].as_array().expect("tasks");
    assert_eq!(tasks.len(), 7);
    assert!(tasks.iter().all(|t| t["verdict"] == "ok" && t["wcrt_us"].is_string()));
    let ctrl = v["resources"].as_array().expect("resources").iter().find(|r| r["name"] == "ctrl").expect("VM ctrl");
    assert_eq!(ctrl["kind"], "vm");
    assert_eq!(ctrl["supply"], "worst-case");
    // The overloaded example reports the miss in JSON too.
    let out = vigil(&["analyze", &example("overload-miss.toml").display().to_string(), "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stdout is JSON");
    assert_eq!(v["all_deadlines_met"], serde_json::Value::Bool(false));
    assert!(v["tasks"].as_array().expect("tasks").iter().any(|t| t["verdict"] == "MISS"));
}

#[test]

fn plot_writes_one_svg_per_task() {
    let scratch = scratch("plot");
    let d = scratch.join("plots");
    let dir = d.display().to_string();
    let out = vigil(&["analyze", &example("control-loop.toml").display().to_string(), "--plot", &dir]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    for t in ["filter", "msg", "controller", "actuate", "housekeeping", "bulk", "monitor"] {
        let svg = std::fs::read_to_string(d.join(format!("{t}.svg"))).unwrap_or_else(|e| panic!("{t}.svg: {e}"));
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"), "{t}.svg is not an SVG");
        assert!(svg.contains("demand upper") && svg.contains("service lower") && svg.matches("<path").count() == 4, "{t}.svg");
    }
}

// ------------------------------------------------------------------ vigil plan

#[test]
fn plan_covers_every_single_host_failure_of_the_cluster() {
    let out = vigil(&["plan", &example("cluster.toml").display().to_string()]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "stdout:\n{stdout}\nstderr:\n{}", text(&out.stderr));
    for t in [
        "Scenario hostA: covered (optimal",
        "activate backup of relay (held on hostB)",
        "start new backup of relay on",
        "Scenario hostC: covered",
        "restart voter on",
        "3 covered, 0 degraded, 0 uncoverable",
    ] {
        assert!(stdout.contains(t), "{t:?} missing from:\n{stdout}");
    }
}

#[test]
fn plan_with_two_faults_and_links_exits_1_and_says_what_is_given_up() {
    let out = vigil(&["plan", &example("cluster.toml").display().to_string(), "--faults", "2", "--links", "--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let plans = v["plans"].as_array().expect("plans");
    // 3 hosts and 4 links: 7 single faults and 21 pairs.
    assert_eq!(plans.len(), 28);
    let by = |name: &str| plans.iter().find(|p| p["scenario"] == name).unwrap_or_else(|| panic!("scenario {name}"));
    // Losing two of three hosts leaves room for the most critical VMs only.
    let ab = by("hostA+hostB");
    assert_eq!(ab["coverage"], "degraded");
    assert!(ab["given_up"].as_array().expect("list").iter().any(|g| g["kind"] == "vm"), "{ab}");
    // The fieldbus is a fixed link: what runs over it is lost whatever the plan.
    let f = by("fieldbus");
    assert_eq!(f["coverage"], "uncoverable");
    assert!(f["lost"].as_array().expect("list").iter().any(|x| x == "protection"), "{f}");
    // Every action is one of the documented kinds.
    for p in plans {
        for a in p["actions"].as_array().expect("actions") {
            let k = a["action"].as_str().expect("kind");
            assert!(["stop", "stop-backup", "migrate", "activate-backup", "restart", "start-backup"].contains(&k), "{a}");
        }
    }
}

#[test]
fn plan_rejects_files_without_hosts_and_bad_flags() {
    let out = vigil(&["plan", &example("simple.toml").display().to_string()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("no [[host]] items"), "{}", text(&out.stderr));
    let out = vigil(&["plan", &example("cluster.toml").display().to_string(), "--faults", "0"]);
    assert_eq!(out.status.code(), Some(2));
    let d = scratch("plan-bad");
    let f = d.join("c.toml");
    let bad = std::fs::read_to_string(example("cluster.toml")).expect("example").replacen("backup = \"hostB\"", "backup = \"hostA\"", 1);
    std::fs::write(&f, bad).expect("write");
    let out = vigil(&["plan", &f.display().to_string()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("vm \"relay\": backup on host \"hostA\""), "{}", text(&out.stderr));
}

#[test]
fn bad_replication_options_exit_2_and_say_why() {
    let cases: &[(&[&str], &str)] = &[
        (&["vm", "run", "--image", "/nonexistent", "--protect", "127.0.0.1:1"], "--arbiter"),
        (
            &[
                "vm",
                "run",
                "--image",
                "/nonexistent",
                "--protect",
                "127.0.0.1:1",
                "--arbiter",
                "127.0.0.1:2",
                "--key-file",
                "KEY",
                "--policy",
                "slow",
            ],
            "checkpoint policy \"slow\": unknown",
        ),
        (
            &[
                "vm",
                "run",
                "--image",
                "/nonexistent",
                "--protect",
                "127.0.0.1:1",
                "--arbiter",
                "127.0.0.1:2",
                "--key-file",
                "KEY",
                "--policy",
                "fixed:0",
            ],
            "outside (0, 60000]",
        ),
        (
            &[
                "vm",
                "run",
                "--image",
                "/nonexistent",
                "--protect",
                "127.0.0.1:1",
                "--arbiter",
                "127.0.0.1:2",
                "--key-file",
                "KEY",
                "--heartbeat-ms",
                "50",
                "--timeout-ms",
                "40",
            ],
            "heartbeat interval (50 ms) must be positive and below the timeout (40 ms)",
        ),
        (
            &["backup", "--listen", "127.0.0.1:0", "--arbiter", "127.0.0.1:1", "--key-file", "KEY", "--disk", "/nonexistent/disk"],
            "/nonexistent/disk: no such file",
        ),
        (
            &["backup", "--listen", "127.0.0.1:0", "--arbiter", "127.0.0.1:1", "--key-file", "KEY", "--policy", "often"],
            "checkpoint policy \"often\": unknown",
        ),
        (&["backup", "--listen", "256.0.0.1:7", "--arbiter", "127.0.0.1:1", "--key-file", "KEY"], "cannot listen on 256.0.0.1:7"),
        (&["backup", "--listen", "127.0.0.1:0", "--arbiter", "127.0.0.1:1"], "--key-file"),
        (
            &["backup", "--listen", "127.0.0.1:0", "--arbiter", "127.0.0.1:1", "--key-file", "SHORT"],
            "a key has 16 to 4096 bytes, this one 8",
        ),
        (&["vm", "run", "--image", "/nonexistent", "--protect", "127.0.0.1:1", "--arbiter", "127.0.0.1:2"], "--protect needs --key-file"),
        (&["arbiter", "--listen", "nowhere", "--state", "STATE", "--key-file", "KEY"], "cannot listen on nowhere"),
        (&["arbiter", "--listen", "127.0.0.1:0", "--key-file", "KEY"], "--state"),
        (&["arbiter", "--listen", "127.0.0.1:0", "--state", "STATE", "--key-file", "/nonexistent/key"], "key file /nonexistent/key"),
        (&["arbiter", "--listen", "127.0.0.1:0", "--state", "BADSTATE", "--key-file", "KEY"], "line 2: unexpected line"),
        (&["bench", "replication", "--policies", "fixed:25,bogus"], "checkpoint policy \"bogus\": unknown"),
    ];
    let dir = scratch("keys");
    std::fs::write(dir.join("key"), [7u8; 32]).expect("key");
    std::fs::write(dir.join("short"), [7u8; 8]).expect("key");
    std::fs::write(dir.join("bad"), "vigil-leases 1\nsteal everything\n").expect("state");
    let path = |n: &str| dir.join(n).display().to_string();
    let (key, short, state, bad) = (path("key"), path("short"), path("state"), path("bad"));
    for (args, want) in cases {
        let args: Vec<&str> = args
            .iter()
            .map(|a| match *a {
                "KEY" => key.as_str(),
                "SHORT" => short.as_str(),
                "STATE" => state.as_str(),
                "BADSTATE" => bad.as_str(),
                a => a,
            })
            .collect();
        let out = vigil(&args);
        assert_eq!(out.status.code(), Some(2), "vigil {args:?}: {}", text(&out.stderr));
        assert!(text(&out.stderr).contains(want), "vigil {args:?}: expected {want:?} in {}", text(&out.stderr));
    }
}

/// A VM of period 30 ms whose one task needs 26 ms every 70 ms: under the worst-case supply the
/// job released at 0 gets Q + max(0, 2Q − 20 ms) by 70 ms, so the smallest budget is 46/3 ms
/// exactly; on a 1 ms grid it is 16 ms, on a 0.5 ms grid 15.5 ms.
#[test]
fn minimal_budget_is_exact_and_on_the_chosen_grid() {
    let body = "[[processor]]\nname = \"host\"\n\n[[vm]]\nname = \"vm\"\nhost = \"host\"\nbudget = \"30ms\"\nperiod = \"30ms\"\n\n\
                [[stream]]\nname = \"s\"\nmodel = \"periodic\"\nperiod = \"70ms\"\n\n\
                [[task]]\nname = \"t\"\non = \"vm\"\ninput = \"s\"\nwcet = \"26ms\"\npriority = 1\ndeadline = \"70ms\"\n";
    let vm = |extra: &[&str]| {
        let (out, _) = analyze_text("budget", body, extra);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stdout is JSON");
        v["resources"].as_array().expect("resources").iter().find(|r| r["name"] == "vm").expect("vm").clone()
    };
    let r = vm(&["--json", "--budget-step", "1ms"]);
    assert_eq!(r["min_budget_exact_us"], "46000/3");
    assert_eq!(r["min_budget_us"], "16000");
    assert!(r["supply_convention"].as_str().is_some_and(|c| c.contains("anywhere")));
    assert_eq!(r["min_budgets"][1]["supply"], "release-synchronous");
    assert!(r["min_budgets"][1]["supply_convention"].as_str().is_some_and(|c| c.contains("end of each period")));
    let r = vm(&["--json", "--budget-step", "500us"]);
    assert_eq!(r["min_budget_us"], "15500");
    let (out, _) = analyze_text("budget-table", body, &["--budget-step", "1ms"]);
    assert!(text(&out.stdout).contains("(exact 46/3 ms)"), "{}", text(&out.stdout));
    let (out, _) = analyze_text("budget-bad", body, &["--budget-step", "-1ms"]);
    assert_eq!(out.status.code(), Some(2));
}

/// A displaced VM that fits nowhere: the plan has no action, and the text says so without
/// claiming nothing was needed; a quick pass (`--budget 0`) that leaves a scenario degraded says
/// it was only the quick pass; `--json` gives per-task response times, deadlines and slack.
#[test]
fn plan_text_is_consistent_and_json_has_task_rows() {
    let d = scratch("plan-text");
    let f = d.join("c.toml");
    let body = "[[host]]\nname = \"h0\"\nmemory = \"8GiB\"\nprocessors = [\"p0\"]\n\n\
                [[host]]\nname = \"h1\"\nmemory = \"4GiB\"\nprocessors = [\"p1\"]\n\n\
                [[processor]]\nname = \"p0\"\n\n[[processor]]\nname = \"p1\"\n\n\
                [[vm]]\nname = \"big\"\nhost = \"p0\"\nbudget = \"2ms\"\nperiod = \"10ms\"\nmemory = \"6GiB\"\n\n\
                [[vm]]\nname = \"small\"\nhost = \"p1\"\nbudget = \"2ms\"\nperiod = \"10ms\"\nmemory = \"1GiB\"\n\n\
                [[stream]]\nname = \"s\"\nmodel = \"periodic\"\nperiod = \"20ms\"\n\n\
                [[task]]\nname = \"t\"\non = \"small\"\ninput = \"s\"\nwcet = \"1ms\"\npriority = 1\ndeadline = \"30ms\"\n";
    std::fs::write(&f, body).expect("write");
    let path = f.display().to_string();
    let out = vigil(&["plan", &path]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    let h0 = stdout.split("Scenario h0").nth(1).expect("scenario h0");
    let h0 = h0.split("\n\n").next().unwrap_or_default();
    assert!(!h0.contains("no action needed"), "{h0}");
    assert!(h0.contains("(no action: what survived stays as it is)"), "{h0}");
    assert!(h0.contains("VM big not restarted: its host failed"), "{h0}");
    // JSON: per-task rows after the plan.
    let out = vigil(&["plan", &path, "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let plans = v["plans"].as_array().expect("plans");
    let p1 = plans.iter().find(|p| p["scenario"] == "h1").expect("scenario h1");
    let t = p1["tasks"].as_array().expect("tasks").iter().find(|t| t["task"] == "t").expect("task t").clone();
    assert_eq!(t["status"], "ok", "{t}");
    assert!(t["wcrt_us"].is_string() && t["deadline_us"] == "30000" && t["slack_us"].is_string(), "{t}");
    // The cluster example with the quick pass only: hostB is degraded, and the plan says the
    // full search did not run (the full search covers it).
    let out = vigil(&["plan", &example("cluster.toml").display().to_string(), "--budget", "0"]);
    let stdout = text(&out.stdout);
    assert!(stdout.contains("Scenario hostB: DEGRADED (quick pass only: a better plan may exist"), "{stdout}");
}
