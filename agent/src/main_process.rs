//! The VM's main process: the image's Entrypoint and Cmd, started once per
//! boot on the host's request, with the image's Env, WorkingDir and User.
//! Its output goes to the console (the host keeps it as the VM's log);
//! when it exits, PID 1 powers the guest off and the shutdown announcement
//! carries its exit status, which becomes the VM's.

use std::io;
use std::process::{Command, Stdio};
use std::sync::Mutex;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::children;
use crate::children::DEFAULT_PATH;
use crate::protocol::{ExitStatus, MainRequest};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    NotStarted,
    Running(u32),
    Exited(u32, ExitStatus),
    /// It could not start; the guest powers off as if it had exited so.
    Failed(ExitStatus),
}

static MAIN: Mutex<State> = Mutex::new(State::NotStarted);

/// How the main process ended, once it has.
pub fn exit_status() -> Option<ExitStatus> {
    match *MAIN.lock().ok()? {
        State::Exited(_, status) | State::Failed(status) => Some(status),
        _ => None,
    }
}

/// Starts the main process, or answers the pid of the one this boot
/// started already (a host that reconnects asks again). One that cannot
/// start ends the guest as an exit would, with a shell's status for it.
pub fn run(main: MainRequest) -> io::Result<u32> {
    let mut state = MAIN
        .lock()
        .map_err(|_| io::Error::other("main process state poisoned"))?;
    match *state {
        State::Running(pid) | State::Exited(pid, _) => return Ok(pid),
        State::Failed(_) => {
            return Err(io::Error::other(
                "the main process could not start; the guest is powering off",
            ));
        }
        State::NotStarted => {}
    }
    let (pid, exited) = match start(&main) {
        Ok(started) => started,
        Err(e) => {
            crate::log!("main process cannot start: {e}: powering off");
            *state = State::Failed(start_failure(&e));
            // PID 1's signal loop runs the poweroff.
            let _ = kill(Pid::this(), Signal::SIGUSR2);
            return Err(e);
        }
    };
    *state = State::Running(pid);
    let program = main.argv.first().map(String::as_str).unwrap_or_default();
    crate::log!("main process {program} started (pid {pid})");
    crate::spawn_thread("main", move || {
        let status = exited.recv().unwrap_or(ExitStatus {
            code: None,
            signal: None,
        });
        crate::log!(
            "main process exited (code {:?}, signal {:?})",
            status.code,
            status.signal
        );
        if let Ok(mut state) = MAIN.lock() {
            *state = State::Exited(pid, status);
        }
        let _ = kill(Pid::this(), Signal::SIGUSR2);
    })?;
    Ok(pid)
}

/// Spawns the image's command as its user, in its directory, with its
/// environment: its pid and where its exit status arrives.
fn start(main: &MainRequest) -> io::Result<(u32, std::sync::mpsc::Receiver<ExitStatus>)> {
    let Some((program, args)) = main.argv.split_first() else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the image sets no Entrypoint or Cmd",
        ));
    };
    let mut command = Command::new(program);
    command
        .args(args)
        .env_clear()
        .current_dir(main.cwd.as_deref().filter(|c| !c.is_empty()).unwrap_or("/"))
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit());
    let env = environment(&main.env);
    command.envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    if let Some(user) = main.user.as_deref().filter(|u| !u.is_empty()) {
        let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
        let group = std::fs::read_to_string("/etc/group").unwrap_or_default();
        let (uid, gid) = resolve_user(user, &passwd, &group)?;
        std::os::unix::process::CommandExt::uid(&mut command, uid);
        std::os::unix::process::CommandExt::gid(&mut command, gid);
    }
    let (child, exited) = children::spawn(&mut command)?;
    Ok((child.id(), exited))
}

/// The exit status of a main process that could not start, as a shell
/// gives it: 127 when something it names is not there, else 126.
fn start_failure(error: &io::Error) -> ExitStatus {
    let code = if error.kind() == io::ErrorKind::NotFound {
        127
    } else {
        126
    };
    ExitStatus {
        code: Some(code),
        signal: None,
    }
}

/// The image's `KEY=value` entries, with PATH defaulted.
fn environment(entries: &[String]) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = entries
        .iter()
        .filter_map(|entry| {
            let (key, value) = entry.split_once('=')?;
            (!key.is_empty()).then(|| (key.to_string(), value.to_string()))
        })
        .collect();
    if !env.iter().any(|(key, _)| key == "PATH") {
        env.push(("PATH".into(), DEFAULT_PATH.into()));
    }
    env
}

/// An OCI `User` (`name`, `uid`, `name:group`, `uid:gid`, any mix) as a
/// uid and gid, names looked up in the guest's passwd and group files. A
/// user without a group gets its passwd entry's group, else 0.
fn resolve_user(user: &str, passwd: &str, group: &str) -> io::Result<(u32, u32)> {
    let unknown = |what: &str, name: &str| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("no {what} {name:?} in the image's /etc/{what}"),
        )
    };
    let (user, group_name) = match user.split_once(':') {
        Some((user, group)) => (user, Some(group)),
        None => (user, None),
    };
    let entry = |file: &str, name: &str| -> Option<Vec<String>> {
        file.lines()
            .map(|line| line.split(':').map(str::to_string).collect::<Vec<_>>())
            .find(|fields| fields.first().is_some_and(|f| f == name))
    };
    let (uid, primary) = match user.parse::<u32>() {
        Ok(uid) => {
            let primary = passwd
                .lines()
                .map(|line| line.split(':').collect::<Vec<_>>())
                .find(|f| f.get(2).and_then(|u| u.parse::<u32>().ok()) == Some(uid))
                .and_then(|f| f.get(3).and_then(|g| g.parse().ok()));
            (uid, primary)
        }
        Err(_) => {
            let fields = entry(passwd, user).ok_or_else(|| unknown("passwd", user))?;
            let uid = fields
                .get(2)
                .and_then(|u| u.parse().ok())
                .ok_or_else(|| unknown("passwd", user))?;
            (uid, fields.get(3).and_then(|g| g.parse().ok()))
        }
    };
    let gid = match group_name {
        None => primary.unwrap_or(0),
        Some(name) => match name.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => entry(group, name)
                .and_then(|fields| fields.get(2).and_then(|g| g.parse().ok()))
                .ok_or_else(|| unknown("group", name))?,
        },
    };
    Ok((uid, gid))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\nweb:x:1000:100::/srv:/bin/sh\n";
    const GROUP: &str = "root:x:0:\nusers:x:100:\nstaff:x:50:web\n";

    #[test]
    fn users_resolve_by_name_or_number_with_their_group() {
        let resolve = |user| resolve_user(user, PASSWD, GROUP).ok();
        assert_eq!(resolve("web"), Some((1000, 100)));
        assert_eq!(resolve("1000"), Some((1000, 100)));
        assert_eq!(resolve("web:staff"), Some((1000, 50)));
        assert_eq!(resolve("4242:7"), Some((4242, 7)));
        assert_eq!(resolve("4242"), Some((4242, 0)));
        assert_eq!(resolve("root"), Some((0, 0)));
        assert_eq!(resolve("nobody"), None);
        assert_eq!(resolve("web:wheel"), None);
    }

    #[test]
    fn a_main_process_that_cannot_start_exits_as_a_shell_says() {
        let missing = io::Error::from(io::ErrorKind::NotFound);
        assert_eq!(start_failure(&missing).code, Some(127));
        let denied = io::Error::from(io::ErrorKind::PermissionDenied);
        assert_eq!(start_failure(&denied).code, Some(126));
        let unknown_user = resolve_user("nobody", PASSWD, GROUP).expect_err("no nobody");
        assert_eq!(start_failure(&unknown_user).code, Some(127));
    }

    #[test]
    fn the_image_env_is_kept_and_path_defaulted() {
        let env = environment(&["A=1".into(), "B=x=y".into(), "junk".into(), "=v".into()]);
        assert_eq!(
            env,
            [
                ("A".to_string(), "1".to_string()),
                ("B".to_string(), "x=y".to_string()),
                ("PATH".to_string(), DEFAULT_PATH.to_string()),
            ]
        );
        let env = environment(&["PATH=/bin".into()]);
        assert_eq!(env, [("PATH".to_string(), "/bin".to_string())]);
    }
}
