//! The cluster's event log against a real store server: bounded, the newest kept, in order.

use agent::cluster::{self, Event};
use store::server::{Config, Server};

#[test]
fn the_event_log_keeps_only_the_newest_events() {
    let d = std::env::temp_dir().join(format!("vigil-events-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("temp dir");
    let cfg = Config::local(d.join("sock"), d.join("data"));
    let server = Server::bind(&cfg).expect("server binds");
    std::thread::spawn(move || server.run());
    let mut c = store::Client::connect(&cfg.socket).expect("connect");
    for k in 0..30 {
        assert_eq!(cluster::log_event_keeping(&mut c, &Event::now("test", format!("event {k}")), 20).expect("logged"), k);
    }
    let all = cluster::events(&mut c, 1000).expect("events");
    let what: Vec<&str> = all.iter().map(|e| e.what.as_str()).collect();
    let want: Vec<String> = (10..30).map(|k| format!("event {k}")).collect();
    assert_eq!(what, want.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(cluster::events(&mut c, 3).expect("events").len(), 3);
    let _ = std::fs::remove_dir_all(&d);
}
