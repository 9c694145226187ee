//! SO_PEERCRED admission against real users: a system-mode daemon shares
//! its socket with one group; a member gets in, anyone else is refused even
//! when the socket's file mode would let them connect. Needs root (to
//! create users and to switch to them); skips with a reason otherwise.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use common::*;

/// Users and a group made for one test, removed even if it fails.
struct TestAccounts {
    group: String,
    users: Vec<String>,
}

impl TestAccounts {
    fn create(tag: &str) -> TestAccounts {
        let group = format!("bgt{tag}");
        let run = |cmd: &mut Command| {
            let out = cmd.output().expect("run account tool");
            assert!(
                out.status.success(),
                "{cmd:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(Command::new("groupadd").arg(&group));
        let mut accounts = TestAccounts {
            group: group.clone(),
            users: Vec::new(),
        };
        for (user, in_group) in [
            (format!("bgt{tag}in"), true),
            (format!("bgt{tag}out"), false),
        ] {
            let mut useradd = Command::new("useradd");
            useradd.args(["--no-create-home", "--shell", "/usr/sbin/nologin"]);
            if in_group {
                useradd.args(["-G", &group]);
            }
            run(useradd.arg(&user));
            accounts.users.push(user);
        }
        accounts
    }
}

impl Drop for TestAccounts {
    fn drop(&mut self) {
        for user in &self.users {
            let _ = Command::new("userdel").arg(user).output();
        }
        let _ = Command::new("groupdel").arg(&self.group).output();
    }
}

/// Runs `banger daemon status` as `user`, with the user's groups.
fn status_as(user: &str, banger: &Path, socket: &Path) -> Output {
    Command::new("setpriv")
        .args([
            "--reuid",
            user,
            "--regid",
            user,
            "--init-groups",
            "--reset-env",
            "--",
        ])
        .arg(banger)
        .arg("--socket")
        .arg(socket)
        .args(["daemon", "status", "--json"])
        .output()
        .expect("run banger as another user")
}

#[test]
fn only_root_the_owner_and_group_members_are_admitted() {
    if !nix::unistd::geteuid().is_root() {
        skip(
            "only_root_the_owner_and_group_members_are_admitted",
            "creating users and switching to them needs root",
        );
        return;
    }
    let tag = format!("{:05}", std::process::id() % 100_000);
    let accounts = TestAccounts::create(&tag);
    let (member, outsider) = (&accounts.users[0], &accounts.users[1]);

    let tmp = state_dir();
    let dir = tmp.path();
    // The other users must reach the socket and the CLI.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).expect("chmod dir");
    let banger = dir.join("banger");
    std::fs::copy(BANGER, &banger).expect("copy the CLI");
    let config = dir.join("bangerd.toml");
    std::fs::write(&config, format!("socket_group = \"{}\"\n", accounts.group)).expect("config");
    let state = dir.join("state");

    let mut daemon = Daemon::ready(Daemon::spawn_with(
        &state,
        &["--system", "--config", config.to_str().expect("utf-8 path")],
    ));
    let socket = socket_path(&state);
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).expect("chmod state");
    let mode = std::fs::metadata(&socket)
        .expect("socket")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o660, "system mode shares the socket with the group");

    let admitted = status_as(member, &banger, &socket);
    assert!(
        admitted.status.success(),
        "{}",
        String::from_utf8_lossy(&admitted.stderr)
    );

    // Loosen the file mode: the credential check alone must still refuse.
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666))
        .expect("chmod socket");
    let refused = status_as(outsider, &banger, &socket);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{stderr}");
    let uid = nix::unistd::User::from_name(outsider)
        .expect("lookup")
        .expect("user")
        .uid;
    assert!(
        stderr.contains(&format!("uid {uid} may not use this daemon")),
        "{stderr}"
    );
    let logged = daemon
        .wait_for_line("refused a client")
        .expect("the refusal is logged");
    assert!(logged.contains(&format!("uid={uid}")), "{logged}");

    assert!(daemon.stop().success());
}

#[test]
fn without_the_group_the_system_socket_is_root_only_and_the_log_says_how_to_fix_it() {
    let test = "without_the_group_the_system_socket_is_root_only_and_the_log_says_how_to_fix_it";
    if !nix::unistd::geteuid().is_root() {
        skip(test, "system mode needs root");
        return;
    }
    let tmp = state_dir();
    let config = tmp.path().join("bangerd.toml");
    std::fs::write(&config, "socket_group = \"banger-no-such-group\"\n").expect("config");
    let state = tmp.path().join("state");
    let mut daemon = Daemon::ready(Daemon::spawn_with(
        &state,
        &["--system", "--config", config.to_str().expect("utf-8 path")],
    ));
    let mode = std::fs::metadata(socket_path(&state))
        .expect("socket")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    let line = daemon
        .wait_for_line_from(&["socket group does not exist"], 0)
        .expect("logged")
        .1;
    assert!(
        line.contains("groupadd --system banger-no-such-group"),
        "{line}"
    );
    assert!(daemon.stop().success());
}
