//! The `[[run]]` items (how VMs run under `vigil up`): read from the example, and every bad
//! value named with its file, line and VM.

use std::path::Path;

fn example() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/substation.toml")).expect("example")
}

fn parse(text: &str) -> Result<model::Loaded, String> {
    model::parse(text, "m.toml", Path::new(".")).map_err(|e| e.to_string())
}

#[test]
fn the_example_says_how_each_vm_runs() {
    let l = parse(&example()).expect("the example parses");
    let relay = l.runs.iter().find(|r| r.vm == "relay").expect("relay runs");
    assert_eq!(relay.image, "kv");
    assert_eq!(relay.memory_mib, 32);
    assert_eq!(relay.ip, Some(("10.99.0.50".parse().unwrap(), 24)));
    assert_eq!(relay.port, Some(6379));
    assert_eq!(relay.policy.as_deref(), Some("adaptive"));
    assert_eq!(l.runs.len(), 3);
    // The analysis ignores them: the same system with or without.
    let without: String = example().split("[[run]]").next().unwrap().to_string();
    assert_eq!(parse(&without).expect("without runs").system, l.system);
}

#[test]
fn bad_run_items_are_named_with_their_line() {
    let base = example();
    let line_of = |needle: &str| base[..base.find(needle).expect(needle)].lines().count() + 1;
    let cases: Vec<(String, usize, &str)> = vec![
        (base.replace("vm = \"logger\"\nimage", "vm = \"loger\"\nimage"), line_of("vm = \"logger\"\nimage"), "no [[vm]] named \"loger\""),
        (
            base.replace("memory = \"32MiB\"\nip = \"10.99.0.51/24\"", "memory = \"3MB\"\nip = \"10.99.0.51/24\""),
            line_of("ip = \"10.99.0.51/24\"") - 1,
            "whole number of MiB",
        ),
        (
            base.replace("memory = \"32MiB\"\nip = \"10.99.0.51/24\"", "memory = \"512MiB\"\nip = \"10.99.0.51/24\""),
            line_of("ip = \"10.99.0.51/24\"") - 1,
            "more than the 256 MiB its [[vm]] reserves",
        ),
        (base.replace("ip = \"10.99.0.51/24\"", "ip = \"10.99.0.500/24\""), line_of("ip = \"10.99.0.51/24\""), "not an IPv4 address"),
        (base.replace("ip = \"10.99.0.51/24\"", "ip = \"10.99.0.51/33\""), line_of("ip = \"10.99.0.51/24\""), "prefix length"),
        (base.replace("ip = \"10.99.0.51/24\"", "ip = \"10.99.0.50/24\""), line_of("ip = \"10.99.0.51/24\""), "VM \"relay\"'s address too"),
        (base.replace("port = 6379\npolicy", "port = 70000\npolicy"), line_of("port = 6379\npolicy"), "not a TCP port"),
        (
            base.replace("vm = \"control\"\nimage = \"kv\"\n", "vm = \"control\"\n"),
            line_of("vm = \"control\"\nimage") - 1,
            "missing key `image`",
        ),
        (base.replace("vm = \"logger\"\nimage", "vm = \"relay\"\nimage"), line_of("vm = \"logger\"\nimage"), "already has a [[run]] item"),
        (
            base.replace("port = 6379\npolicy", "port = 6379\ndisk = \"1.5MiB\"\npolicy"),
            line_of("port = 6379\npolicy") + 1,
            "whole number of MiB",
        ),
        (
            base.replace("port = 6379\npolicy", "port = 6379\ndisk = 64\npolicy"),
            line_of("port = 6379\npolicy") + 1,
            "a quantity with a unit",
        ),
        (
            base.replace("port = 6379\npolicy", "port = 6379\ndisk = \"128GiB\"\npolicy"),
            line_of("port = 6379\npolicy") + 1,
            "from 1MiB to 64GiB",
        ),
        (
            base.replace("port = 6379\npolicy", "port = 6379\nblk_backend = \"process\"\npolicy"),
            line_of("port = 6379\npolicy") + 1,
            "the VM has no disk: give the [[run]] a `disk`",
        ),
        (
            base.replace("port = 6379\npolicy", "port = 6379\ndisk = \"8MiB\"\nblk_backend = \"thread\"\npolicy"),
            line_of("port = 6379\npolicy") + 2,
            "\"thread\": \"vmm\" or \"process\"",
        ),
    ];
    for (text, line, want) in cases {
        let e = parse(&text).expect_err(want);
        assert!(e.starts_with(&format!("m.toml:{line}: run ")), "{want}: {e}");
        assert!(e.contains(want), "{want}: {e}");
    }
    let e = parse(&base.replace("port = 6379\npolicy", "port = 6379\nspeed = 3\npolicy")).expect_err("unknown key");
    assert!(e.contains("unknown field `speed`"), "{e}");
}

#[test]
fn a_vm_may_have_a_disk_with_its_backend_in_a_process() {
    let text = example().replace("port = 6379\npolicy", "port = 6379\ndisk = \"16MiB\"\nblk_backend = \"process\"\npolicy");
    let l = parse(&text).expect("parses");
    let relay = l.runs.iter().find(|r| r.vm == "relay").expect("relay runs");
    assert_eq!((relay.disk_mib, relay.blk_backend_process), (Some(16), true));
    let control = l.runs.iter().find(|r| r.vm == "control").expect("control runs");
    assert_eq!((control.disk_mib, control.blk_backend_process), (None, false));
    let l = parse(&example().replace("port = 6379\npolicy", "port = 6379\ndisk = \"1GiB\"\npolicy")).expect("parses");
    assert_eq!(l.runs.iter().find(|r| r.vm == "relay").map(|r| (r.disk_mib, r.blk_backend_process)), Some((Some(1024), false)));
}

fn voted() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/voted.toml")).expect("example")
}

/// examples/voted.toml with `tables` after the relay's `[[run]]` keys.
fn voted_with(tables: &str) -> String {
    let run = "port = 6379\n\n[[run]]\nvm = \"logger\"";
    let text = voted();
    assert!(text.contains(run), "examples/voted.toml changed");
    text.replacen(run, &format!("port = 6379\n{tables}\n[[run]]\nvm = \"logger\""), 1)
}

#[test]
fn an_instance_of_a_voted_vm_may_run_another_version() {
    let l = parse(&voted_with("[[run.instance]]\nnumber = 3\nargs = [\"wrong=1000\"]\n[[run.instance]]\nnumber = 2\nimage = \"kv-alt\"\n"))
        .expect("parses");
    let relay = l.runs.iter().find(|r| r.vm == "relay").expect("relay runs");
    assert_eq!(
        relay.versions,
        vec![
            model::run::Version { instance: 1, image: Some("kv-alt".into()), args: vec![] },
            model::run::Version { instance: 2, image: None, args: vec!["wrong=1000".into()] },
        ]
    );
    assert_eq!(relay.images().collect::<Vec<_>>(), vec!["kv", "kv-alt"]);
    assert!(l.runs.iter().find(|r| r.vm == "logger").expect("logger").versions.is_empty());
}

#[test]
fn bad_instance_versions_are_named_with_their_line() {
    let line_in = |text: &str, needle: &str| text[..text.find(needle).expect(needle)].lines().count() + 1;
    let cases: Vec<(String, &str, &str)> = vec![
        (voted_with("[[run.instance]]\nnumber = 4\nargs = [\"x\"]\n"), "number = 4", "4: the VM has 3 instances, numbered 1 to 3"),
        (voted_with("[[run.instance]]\nnumber = 0\nargs = [\"x\"]\n"), "number = 0", "numbered 1 to 3"),
        (
            voted_with("[[run.instance]]\nnumber = 2\nargs = [\"x\"]\n[[run.instance]]\nnumber = 2\nimage = \"y\"\n"),
            "number = 2\nimage",
            "instance 2 is given twice",
        ),
        (voted_with("[[run.instance]]\nnumber = 2\nimage = \"\"\n"), "image = \"\"", "empty image"),
        (voted_with("[[run.instance]]\nnumber = 2\n"), "[[run.instance]]", "runs like the others"),
        (voted_with("[[run.instance]]\nargs = [\"x\"]\n"), "[[run.instance]]", "missing key `number`"),
    ];
    for (text, at, want) in cases {
        let e = parse(&text).expect_err(want);
        let line = line_in(&text, at);
        assert!(e.starts_with(&format!("m.toml:{line}: run ")), "{want}: {e} (expected line {line})");
        assert!(e.contains(want), "{want}: {e}");
    }
    // An unknown key is refused by the reader, and a VM with one instance has no versions.
    let e = parse(&voted_with("[[run.instance]]\nnumber = 2\nimages = \"x\"\n")).expect_err("unknown key");
    assert!(e.contains("images"), "{e}");
    let logger = voted();
    assert!(logger.trim_end().ends_with("port = 6379"), "examples/voted.toml's last [[run]] is the logger's");
    let logger = format!("{logger}\n[[run.instance]]\nnumber = 1\nargs = [\"x\"]\n");
    let e = parse(&logger).expect_err("one instance");
    assert!(e.contains("run \"logger\"") && e.contains("the VM runs one instance"), "{e}");
    // The voted instances cannot share one disk.
    let e = parse(&voted_with("disk = \"8MiB\"\n")).expect_err("a voted VM's disk");
    assert!(e.contains("run \"relay\"") && e.contains("3 voted instances, which cannot share one disk"), "{e}");
}
