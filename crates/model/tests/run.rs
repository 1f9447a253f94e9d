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
    ];
    for (text, line, want) in cases {
        let e = parse(&text).expect_err(want);
        assert!(e.starts_with(&format!("m.toml:{line}: run ")), "{want}: {e}");
        assert!(e.contains(want), "{want}: {e}");
    }
    let e = parse(&base.replace("port = 6379\npolicy", "port = 6379\nspeed = 3\npolicy")).expect_err("unknown key");
    assert!(e.contains("unknown field `speed`"), "{e}");
}
