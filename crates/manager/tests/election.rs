//! Leader election against a real store server: one leader at a time, a standby takes over
//! only after the leader's lease, and never while another may still act. (Generations across
//! restarts of the store process: `crates/vigil/tests/cluster.rs`.)

use manager::election::{Election, Role};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use store::server::{Config, Server};

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vigil-election-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

/// Serves a store on `dir/sock` with its log in `dir/data` (in this process).
fn serve(dir: &Path) -> PathBuf {
    let cfg = Config::local(dir.join("sock"), dir.join("data"));
    let _ = std::fs::remove_file(&cfg.socket);
    let server = Server::bind(&cfg).expect("server binds");
    std::thread::spawn(move || server.run());
    cfg.socket
}

fn client(sock: &Path) -> store::Client {
    store::Client::connect(sock).expect("connect")
}

#[test]
fn a_standby_takes_over_only_after_the_lease_and_the_old_leader_steps_down() {
    let d = dir("takeover");
    let sock = serve(&d);
    let lease = Duration::from_millis(200);
    let (mut ca, mut cb) = (client(&sock), client(&sock));
    let mut a = Election::new("a", lease);
    let mut b = Election::new("b", lease);
    assert_eq!(a.step(&mut ca).unwrap(), Role::Leader { generation: 1, took_over: true });
    assert!(a.may_act());
    // While a renews, b never takes over.
    let t = Instant::now();
    let mut renewed_at = Instant::now();
    while t.elapsed() < lease * 3 {
        renewed_at = Instant::now();
        assert_eq!(a.step(&mut ca).unwrap(), Role::Leader { generation: 1, took_over: false });
        assert_eq!(b.step(&mut cb).unwrap(), Role::Standby { leader: Some("a".into()) });
        assert!(!b.may_act());
        std::thread::sleep(Duration::from_millis(20));
    }
    // a stalls: it may act for half a lease after its last renewal, no longer.
    let stalled = Instant::now();
    let mut took = None;
    while took.is_none() {
        if let Role::Leader { generation, took_over: true } = b.step(&mut cb).unwrap() {
            took = Some((generation, renewed_at.elapsed()));
        } else {
            assert!(stalled.elapsed() < lease * 5, "b never took over");
        }
        if renewed_at.elapsed() >= lease / 2 {
            assert!(!a.may_act(), "a still thinks it may act {:?} after its last renewal", renewed_at.elapsed());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let (generation, after) = took.unwrap();
    assert_eq!(generation, 2);
    assert!(after >= lease, "b took over {after:?} after a's last renewal, within the lease");
    // a comes back: it has lost the lead and stays a standby.
    assert_eq!(a.step(&mut ca).unwrap(), Role::Standby { leader: Some("b".into()) });
    assert!(!a.may_act());
}

/// Three managers step at random moments with random stalls: every takeover happens after
/// every other manager's right to act (half a lease after its last renewal) has ended.
#[test]
fn random_stalls_never_give_two_managers_the_right_to_act() {
    let d = dir("stalls");
    let sock = serve(&d);
    let lease = Duration::from_millis(120);
    let origin = Instant::now();
    // (id, start of renewal window, end of window) and (id, takeover time).
    let windows: Arc<Mutex<Vec<(String, Duration, Duration)>>> = Arc::default();
    let takeovers: Arc<Mutex<Vec<(String, Duration)>>> = Arc::default();
    let threads: Vec<_> = (0..3u64)
        .map(|i| {
            let (sock, windows, takeovers) = (sock.clone(), windows.clone(), takeovers.clone());
            std::thread::spawn(move || {
                let mut c = client(&sock);
                let mut e = Election::new(format!("m{i}"), lease);
                let mut seed = 0x9e3779b97f4a7c15u64.wrapping_mul(i + 1);
                while origin.elapsed() < Duration::from_secs(4) {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    let before = origin.elapsed();
                    if let Ok(Role::Leader { took_over, .. }) = e.step(&mut c) {
                        let id = format!("m{i}");
                        if took_over {
                            takeovers.lock().unwrap().push((id.clone(), origin.elapsed()));
                        }
                        windows.lock().unwrap().push((id, before, before + lease / 2));
                    }
                    // Mostly short sleeps, sometimes a stall longer than the lease.
                    let ms = if seed % 17 == 0 { 150 + seed % 200 } else { 5 + seed % 20 };
                    std::thread::sleep(Duration::from_millis(ms));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let (windows, takeovers) = (windows.lock().unwrap().clone(), takeovers.lock().unwrap().clone());
    assert!(takeovers.len() >= 2, "stalls caused takeovers: {takeovers:?}");
    for (id, at) in &takeovers {
        for (other, from, to) in &windows {
            if other != id && from < at {
                assert!(to <= at, "{id} took over at {at:?} while {other}'s window {from:?}..{to:?} was open");
            }
        }
    }
}
