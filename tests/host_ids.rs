//! banger's own uid for the tools it runs on new root disks (`[host]
//! tool_uid`): a daemon refuses to start when a user, a group or a
//! running process of the host already has it.

mod common;

use std::process::{Command, Stdio};

use common::*;

/// A root daemon's refusal to start with `tool_uid`, or None if it started.
fn start_with_tool_uid(uid: u32) -> Option<String> {
    let state = state_dir();
    let config = state.path().join("bangerd.toml");
    std::fs::write(
        &config,
        format!("[network]\nenabled = false\n[host]\ntool_uid = {uid}\n"),
    )
    .expect("config");
    let mut daemon = Daemon::spawn_with(state.path(), &["--config", &config.to_string_lossy()]);
    let ready = daemon.wait_for_line("daemon ready");
    match ready {
        Some(_) => None,
        None => Some(daemon.wait_output().1),
    }
}

#[test]
fn a_tool_uid_a_user_or_a_running_process_has_is_refused_at_start() {
    let test = "a_tool_uid_a_user_or_a_running_process_has_is_refused_at_start";
    if !nix::unistd::geteuid().is_root() {
        skip(
            test,
            "the tools drop to tool_uid only when the daemon is root",
        );
        return;
    }
    // `daemon` (uid 1) is a user of every Debian system.
    let refused = start_with_tool_uid(1).expect("refused");
    assert!(
        refused.contains("tool_uid 1 is already user daemon"),
        "{refused}"
    );

    // A process running as a uid no user has.
    let uid = 3_987_654_321u32;
    let mut holder = KillOnDrop(
        Command::new("setpriv")
            .args([
                &format!("--reuid={uid}"),
                &format!("--regid={uid}"),
                "--clear-groups",
                "sleep",
                "600",
            ])
            .stdin(Stdio::null())
            .spawn()
            .expect("setpriv"),
    );
    let pid = holder.0.id();
    // setpriv has changed its ids once /proc says so.
    let deadline = std::time::Instant::now() + EVENT_TIMEOUT;
    while !std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .contains(&uid.to_string())
    {
        assert!(
            std::time::Instant::now() < deadline,
            "setpriv never took uid {uid}"
        );
        std::thread::yield_now();
    }
    let refused = start_with_tool_uid(uid).expect("refused");
    assert!(
        refused.contains(&format!("is already process {pid}")),
        "{refused}"
    );
    let _ = holder.0.kill();
    let _ = holder.0.wait();

    // Nobody has it once the process is gone: the daemon starts.
    assert_eq!(start_with_tool_uid(uid), None);
}
