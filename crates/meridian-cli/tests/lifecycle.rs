//! A dev world starts and stops as a unit.

mod support;
use std::time::Duration;
use support::*;

fn alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the PID exists.
    unsafe { libc::kill(pid as i32, 0) == 0 }
}

#[test]
fn ctrl_c_stops_every_process_and_the_description_says_where_everything_is() {
    let mut w = World::start(&[]);
    let d = &w.desc;
    // The description is complete: one supervisor, three control nodes, a
    // region and an edge per region of the default world, and the GeoDNS
    // server, all running.
    let roles: Vec<&str> = d.processes.iter().map(|p| p.role.as_str()).collect();
    assert_eq!(roles.iter().filter(|r| **r == "region").count(), 3);
    assert_eq!(roles.iter().filter(|r| **r == "edge").count(), 3);
    assert_eq!(roles.iter().filter(|r| **r == "control").count(), 3);
    assert_eq!(roles.iter().filter(|r| **r == "supervisor").count(), 1);
    assert_eq!(roles.iter().filter(|r| **r == "dns").count(), 1);
    assert!(d.dns.is_some());
    assert_eq!(d.links.len(), 9 + 6 + 9, "edge->region, region->region and control->edge links");
    let pids: Vec<u32> = d.processes.iter().map(|p| p.pid.expect("every process runs")).collect();
    assert!(pids.iter().all(|p| alive(*p)));
    for p in &d.processes {
        assert!(p.listen.starts_with("127."), "{} listens on {}", p.name, p.listen);
        if let Some(c) = &p.cluster_listen {
            assert!(c.starts_with("127."), "{} has its cluster port on {c}", p.name);
        }
    }
    let (ok, status) = w.cli(&["status"]);
    assert!(ok, "{status}");
    assert!(status.contains("eu-west") && status.contains("healthy"), "{status}");

    let exit = w.interrupt(Duration::from_secs(15)).expect("meridian dev did not stop on Ctrl-C");
    assert!(exit.success(), "{exit}");
    for pid in pids {
        assert!(!alive(pid), "process {pid} survived Ctrl-C");
    }
    assert!(!w.dir.path().join("world.json").exists(), "a stopped world still has a description");
}
