//! PID 1's own work: stage 1 in the initramfs (modules, root disk,
//! switch_root), stage 2 on the root disk (mounts, hostname, network,
//! sshd), and the shutdown that always ends in a reset. Both stages are
//! one process: nothing of banger is on the guest's disk.

use std::ffi::CString;
use std::fs::File;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use nix::mount::{MsFlags, mount};
use nix::sys::reboot::{RebootMode, reboot};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::children;
use crate::cmdline::Cmdline;
use crate::protocol::ShutdownAction;
use crate::server;

/// The modules PID 1 wants, by name, one a line: banger's archive always
/// has it, so its presence marks stage 1.
pub const STAGE1_MARKER: &str = "/etc/banger/stage1";
/// Module files banger packed (a package import), in load order.
pub const MODULE_LIST: &str = "/etc/banger/initramfs";
/// How long the root disk may take to appear.
const ROOT_WAIT: Duration = Duration::from_secs(30);

/// A failure PID 1 cannot get past: said on the console, then a reset
/// (the host sees a crash and applies the VM's restart policy).
pub fn fatal(what: &str) -> ! {
    crate::log!("fatal: {what}; resetting");
    let _ = reboot(RebootMode::RB_AUTOBOOT);
    // reboot(2) does not return for PID 1; park if it somehow did.
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

fn mount_fs(source: &str, target: &str, fstype: &str, flags: MsFlags, data: Option<&str>) {
    let _ = std::fs::create_dir_all(target);
    if let Err(e) = mount(Some(source), target, Some(fstype), flags, data) {
        // EBUSY: already mounted (the kernel or stage 1 did it).
        if e != nix::errno::Errno::EBUSY {
            crate::log!("cannot mount {fstype} on {target}: {e}");
        }
    }
}

/// Stage 1: load the modules, mount the root disk and switch into it;
/// answers when stage 1 started, on the boot clock, for stage 2.
pub fn stage1() -> u64 {
    let started = crate::system::boot_ms();
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount_fs("proc", "/proc", "proc", nosuid, None);
    mount_fs("sysfs", "/sys", "sysfs", nosuid, None);
    mount_fs("devtmpfs", "/dev", "devtmpfs", MsFlags::MS_NOSUID, None);
    load_modules();
    let cmdline = Cmdline::parse(&std::fs::read_to_string("/proc/cmdline").unwrap_or_default());
    let deadline = Instant::now() + ROOT_WAIT;
    while !Path::new(&cmdline.root).exists() {
        if Instant::now() > deadline {
            fatal(&format!("root disk {} did not appear", cmdline.root));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut flags = MsFlags::empty();
    if cmdline.read_only {
        flags |= MsFlags::MS_RDONLY;
    }
    let _ = std::fs::create_dir_all("/newroot");
    if let Err(e) = mount(
        Some(cmdline.root.as_str()),
        "/newroot",
        Some(cmdline.rootfstype.as_str()),
        flags,
        None::<&str>,
    ) {
        fatal(&format!(
            "cannot mount {} ({}) on /newroot: {e}",
            cmdline.root, cmdline.rootfstype
        ));
    }
    for dir in ["dev", "proc", "sys"] {
        let target = format!("/newroot/{dir}");
        let _ = std::fs::create_dir_all(&target);
        if let Err(e) = mount(
            Some(format!("/{dir}").as_str()),
            target.as_str(),
            None::<&str>,
            MsFlags::MS_MOVE,
            None::<&str>,
        ) {
            fatal(&format!("cannot move /{dir} into the root disk: {e}"));
        }
    }
    // The initramfs stays in memory until its files are gone; this
    // process runs from memory already.
    for entry in std::fs::read_dir("/").into_iter().flatten().flatten() {
        let path = entry.path();
        if entry.file_name() == "newroot" {
            continue;
        }
        let _ = match entry.file_type() {
            Ok(kind) if kind.is_dir() => std::fs::remove_dir_all(&path),
            _ => std::fs::remove_file(&path),
        };
    }
    let switched = std::env::set_current_dir("/newroot")
        .map_err(|e| e.to_string())
        .and_then(|()| {
            mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
                .map_err(|e| e.to_string())
        })
        .and_then(|()| nix::unistd::chroot(".").map_err(|e| e.to_string()))
        .and_then(|()| std::env::set_current_dir("/").map_err(|e| e.to_string()));
    if let Err(e) = switched {
        fatal(&format!("cannot switch to the root disk: {e}"));
    }
    started
}

/// The modules banger packed, in their order; then, when the initramfs
/// has the running kernel's `modules.dep` (a user's initrd merged with
/// banger's archive), the wanted modules and what they depend on.
fn load_modules() {
    let listed = std::fs::read_to_string(MODULE_LIST).unwrap_or_default();
    for module in module_list(&listed) {
        load_module(&Path::new("/lib/modules").join(module));
    }
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let tree = Path::new("/lib/modules").join(release);
    let Ok(dependencies) = std::fs::read_to_string(tree.join("modules.dep")) else {
        return;
    };
    let wanted = std::fs::read_to_string(STAGE1_MARKER).unwrap_or_default();
    let wanted: Vec<&str> = module_list(&wanted);
    for module in dependency_order(&dependencies, &wanted) {
        load_module(&tree.join(module));
    }
}

/// The module files (paths relative to the release's tree) that load
/// `wanted`, dependencies first, each once, as modprobe orders them: a
/// `modules.dep` line lists a module's dependencies, the last to load
/// first. Names the file does not have are skipped (built in, or absent);
/// paths that would leave the tree are ignored.
pub fn dependency_order(modules_dep: &str, wanted: &[&str]) -> Vec<String> {
    let mut by_name = std::collections::HashMap::new();
    for line in modules_dep.lines() {
        let Some((module, depends)) = line.split_once(':') else {
            continue;
        };
        let safe = |path: &&str| !path.starts_with('/') && !path.split('/').any(|p| p == "..");
        if !safe(&module) {
            continue;
        }
        let depends: Vec<&str> = depends.split_whitespace().filter(safe).collect();
        if let Some(name) = module_name(module) {
            by_name.insert(name, (module, depends));
        }
    }
    let mut order: Vec<String> = Vec::new();
    for name in wanted {
        let Some((module, depends)) = by_name.get(&name.replace('-', "_")) else {
            continue;
        };
        for path in depends.iter().rev().chain(std::iter::once(module)) {
            if !order.iter().any(|p| p == path) {
                order.push(path.to_string());
            }
        }
    }
    order
}

/// A module file's name as the kernel spells it (`-` as `_`), without its
/// directory and `.ko[.xz|.zst|.gz]` (the host reads packages with it too).
pub fn module_name(path: &str) -> Option<String> {
    let file = path.rsplit('/').next()?;
    let stem = [".ko", ".ko.xz", ".ko.zst", ".ko.gz"]
        .iter()
        .find_map(|suffix| file.strip_suffix(suffix))?;
    Some(stem.replace('-', "_"))
}

/// The initramfs's module list: one file name a line, in load order;
/// blank lines, `#` comments and names that leave `/lib/modules` are
/// skipped.
pub fn module_list(text: &str) -> Vec<&str> {
    text.lines()
        .map(str::trim)
        .filter(|m| !m.is_empty() && !m.starts_with('#'))
        .filter(|m| !m.contains('/') && *m != "." && *m != "..")
        .collect()
}

fn load_module(path: &Path) {
    // Compressed modules are the kernel's to decompress (5.17 on).
    const COMPRESSED_FILE: nix::libc::c_uint = 4;
    let compressed = path
        .extension()
        .is_some_and(|e| e == "xz" || e == "zst" || e == "gz");
    let flags = if compressed {
        nix::kmod::ModuleInitFlags::from_bits_retain(COMPRESSED_FILE)
    } else {
        nix::kmod::ModuleInitFlags::empty()
    };
    let loaded = File::open(path)
        .map_err(|e| nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(0)))
        .and_then(|file| nix::kmod::finit_module(&file, &CString::default(), flags));
    match loaded {
        Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
        Err(e) => crate::log!("cannot load {}: {e}", path.display()),
    }
}

/// Stage 2's set-up of the guest before the agent serves.
pub fn stage2_setup(cmdline: &Cmdline) {
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    if !Path::new("/proc/self").exists() {
        mount_fs("proc", "/proc", "proc", nosuid, None);
    }
    let mounted = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let is_mounted = |target: &str| {
        mounted
            .lines()
            .any(|l| l.split_whitespace().nth(1) == Some(target))
    };
    for (source, target, fstype, flags, data) in [
        ("sysfs", "/sys", "sysfs", nosuid, None),
        ("devtmpfs", "/dev", "devtmpfs", MsFlags::MS_NOSUID, None),
        (
            "devpts",
            "/dev/pts",
            "devpts",
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("gid=5,mode=620,ptmxmode=666"),
        ),
        (
            "shm",
            "/dev/shm",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            None,
        ),
        (
            "run",
            "/run",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=755"),
        ),
        (
            "tmp",
            "/tmp",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            None,
        ),
    ] {
        if !is_mounted(target) {
            mount_fs(source, target, fstype, flags, data);
        }
    }
    if let Some(hostname) = &cmdline.hostname
        && let Err(e) = nix::unistd::sethostname(hostname)
    {
        crate::log!("cannot set the hostname {hostname}: {e}");
    }
    crate::network::configure(cmdline);
    // Ctrl-Alt-Del becomes SIGINT to PID 1: a poweroff request.
    if let Err(e) = nix::sys::reboot::set_cad_enabled(false) {
        crate::log!("cannot take over Ctrl-Alt-Del: {e}");
    }
}

/// Starts sshd when the disk has one, generating host keys first if it
/// has none; PID 1 calls it after it serves the host.
pub fn start_sshd() {
    let sshd = Path::new("/usr/sbin/sshd");
    if !sshd.exists() {
        return;
    }
    let has_keys = std::fs::read_dir("/etc/ssh").is_ok_and(|entries| {
        entries
            .filter_map(|e| e.ok())
            .any(|e| e.file_name().to_string_lossy().starts_with("ssh_host_"))
    });
    if !has_keys {
        children::run(Command::new("/usr/bin/ssh-keygen").arg("-A"));
    }
    let _ = std::fs::create_dir_all("/run/sshd");
    if let Err(e) = children::spawn(Command::new(sshd).arg("-D").arg("-e")) {
        crate::log!("cannot start sshd: {e}");
    }
}

/// Ends the guest: every process asked to stop, then killed; disks synced;
/// the hosts told; then a reset, for a poweroff too (Firecracker on x86 has
/// no ACPI poweroff, and QEMU runs with -no-reboot): the host tells the two
/// apart by the announcement.
pub fn shutdown(action: ShutdownAction) -> ! {
    // Taken before every process is stopped: a main process still running
    // now is ended by the shutdown, not its cause.
    let main_exit = crate::main_process::exit_status();
    crate::log!("{action:?}: stopping every process");
    let _ = kill(Pid::from_raw(-1), Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(5);
    while children::reap() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
    children::reap();
    nix::unistd::sync();
    let _ = mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
        None::<&str>,
    );
    server::announce_shutdown(action, main_exit, Duration::from_secs(2));
    let _ = reboot(RebootMode::RB_AUTOBOOT);
    fatal("reboot(2) returned")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_module_list_keeps_its_order_and_skips_the_rest() {
        let text = "virtio.ko\n  virtio_ring.ko \n\n# comment\nvirtio_blk.ko.zst\n../../etc/x.ko\nvsock.ko";
        assert_eq!(
            module_list(text),
            [
                "virtio.ko",
                "virtio_ring.ko",
                "virtio_blk.ko.zst",
                "vsock.ko"
            ]
        );
        assert!(module_list("").is_empty());
    }

    #[test]
    fn wanted_modules_load_after_their_dependencies_once_each() {
        let dep = "kernel/drivers/virtio/virtio.ko:\n\
            kernel/drivers/virtio/virtio_ring.ko:\n\
            kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko\n\
            kernel/drivers/char/virtio_console.ko.xz: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko\n\
            kernel/fs/evil.ko: ../../../etc/x.ko\n\
            /abs/evil2.ko:\n";
        assert_eq!(
            dependency_order(
                dep,
                &["virtio_blk", "virtio-console", "ext4", "evil", "evil2"]
            ),
            [
                "kernel/drivers/virtio/virtio.ko",
                "kernel/drivers/virtio/virtio_ring.ko",
                "kernel/drivers/block/virtio_blk.ko",
                "kernel/drivers/char/virtio_console.ko.xz",
                "kernel/fs/evil.ko",
            ]
        );
    }
}
