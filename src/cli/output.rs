//! Human output: aligned tables and relative times. `--json` output is the
//! daemon's own JSON, printed as is.

use std::io::Write;

use jiff::Timestamp;
use serde::Serialize;
use tabwriter::TabWriter;

use crate::actors::catalog::ImagesRemoved;
use crate::actors::netns::NetworkView;
use crate::catalog::KernelRecord;
use crate::image::ImageRecord;
use crate::operations::{OperationOutcome, OperationRecord};
use crate::rpc::vm::VmView;
use crate::vm::phase::{Intent, Phase};
use crate::wire_name;

/// Rows aligned in columns two spaces apart; the first row is the header.
pub fn table(rows: &[Vec<String>]) -> String {
    let mut writer = TabWriter::new(Vec::new()).padding(2);
    for row in rows {
        let _ = writeln!(writer, "{}", row.join("\t"));
    }
    let bytes = writer.into_inner().unwrap_or_default();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// "just now", "42s ago", "5m ago", "3h ago", "2d ago".
pub fn ago(then: Timestamp, now: Timestamp) -> String {
    let seconds = now.as_second().saturating_sub(then.as_second());
    match seconds {
        s if s < 1 => "just now".into(),
        s if s < 60 => format!("{s}s ago"),
        s if s < 3600 => format!("{}m ago", s / 60),
        s if s < 86_400 => format!("{}h ago", s / 3600),
        s => format!("{}d ago", s / 86_400),
    }
}

/// "1h 2m 3s" for an uptime.
pub fn duration(seconds: u64) -> String {
    let (h, m, s) = (seconds / 3600, seconds % 3600 / 60, seconds % 60);
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, _) => format!("{m}m {s}s"),
        _ => format!("{h}h {m}m {s}s"),
    }
}

/// "copying 120/400 (30%)", or the phase alone.
pub fn progress(phase: &str, current: Option<u64>, total: Option<u64>) -> String {
    match (current, total) {
        (Some(c), Some(t)) if t > 0 => format!("{phase} {c}/{t} ({}%)", c * 100 / t),
        (Some(c), _) => format!("{phase} {c}"),
        _ => phase.to_string(),
    }
}

pub fn operations_table(operations: &[OperationRecord], now: Timestamp) -> String {
    let mut rows = vec![
        ["OP ID", "METHOD", "TARGET", "STATE", "PROGRESS", "STARTED"]
            .map(String::from)
            .to_vec(),
    ];
    for op in operations {
        let progress = match op.outcome {
            OperationOutcome::Running => {
                progress(op.phase.as_deref().unwrap_or("-"), op.current, op.total)
            }
            _ => op.error.clone().unwrap_or_else(|| "-".into()),
        };
        rows.push(vec![
            op.op_id.clone(),
            op.method.clone(),
            op.target.clone().unwrap_or_else(|| "-".into()),
            wire_name(&op.outcome),
            progress,
            ago(op.started_at, now),
        ]);
    }
    table(&rows)
}

pub fn operation_details(op: &OperationRecord, now: Timestamp) -> String {
    let mut rows = vec![
        vec!["op id:".into(), op.op_id.clone()],
        vec!["method:".into(), op.method.clone()],
        vec![
            "target:".into(),
            op.target.clone().unwrap_or_else(|| "-".into()),
        ],
        vec!["state:".into(), wire_name(&op.outcome)],
    ];
    if op.outcome == OperationOutcome::Running {
        rows.push(vec![
            "progress:".into(),
            progress(op.phase.as_deref().unwrap_or("-"), op.current, op.total),
        ]);
    }
    rows.push(vec![
        "cancellable:".into(),
        if op.cancellable { "yes" } else { "no" }.into(),
    ]);
    rows.push(vec![
        "started:".into(),
        format!("{} ({})", op.started_at, ago(op.started_at, now)),
    ]);
    if let Some(finished) = op.finished_at {
        rows.push(vec![
            "finished:".into(),
            format!("{finished} ({})", ago(finished, now)),
        ]);
    }
    if let Some(error) = &op.error {
        rows.push(vec!["error:".into(), error.clone()]);
    }
    table(&rows)
}

/// The state, with what follows a crash when a restart is scheduled.
pub fn vm_state(vm: &VmView) -> String {
    let state = wire_name(&vm.state);
    match (vm.next_restart_at, &vm.degraded) {
        (Some(at), _) => format!("{state} (restart {})", until(at)),
        (None, Some(_)) => format!("{state} (degraded)"),
        (None, None) => state,
    }
}

fn until(at: Timestamp) -> String {
    let ms = at.as_millisecond() - Timestamp::now().as_millisecond();
    if ms <= 0 {
        "now".into()
    } else {
        format!("in {:.1}s", ms as f64 / 1000.0)
    }
}

pub fn vms_table(vms: &[VmView], now: Timestamp) -> String {
    let mut rows = vec![
        [
            "NAME", "ID", "STATE", "EXIT", "VMM", "PID", "IP", "VCPUS", "MEMORY", "KERNEL",
            "RESTARTS", "CREATED",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for vm in vms {
        rows.push(vec![
            vm.name.clone(),
            vm.id.clone(),
            vm_state(vm),
            match vm.last_exit.map(|e| (e.code, e.signal)) {
                Some((Some(code), _)) => code.to_string(),
                Some((_, Some(signal))) => format!("signal {signal}"),
                _ => "-".into(),
            },
            wire_name(&vm.vmm),
            vm.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
            vm.ip.map(|ip| ip.to_string()).unwrap_or_else(|| "-".into()),
            vm.vcpus.to_string(),
            format!("{} MiB", vm.memory_mib),
            vm.kernel.clone(),
            vm.restart_count.to_string(),
            ago(vm.created_at, now),
        ]);
    }
    table(&rows)
}

pub fn vm_details(vm: &VmView, now: Timestamp) -> String {
    let mut rows = vec![
        vec!["name:".into(), vm.name.clone()],
        vec!["id:".into(), vm.id.clone()],
        vec!["state:".into(), vm_state(vm)],
        vec!["phase:".into(), vm_phase(&vm.phase)],
        vec![
            "vmm:".into(),
            match vm.accel {
                Some(accel) => format!("{} ({})", wire_name(&vm.vmm), wire_name(&accel)),
                None => wire_name(&vm.vmm),
            },
        ],
        vec![
            "pid:".into(),
            vm.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
        ],
        vec!["vcpus:".into(), vm.vcpus.to_string()],
        vec!["memory:".into(), format!("{} MiB", vm.memory_mib)],
        vec!["kernel:".into(), vm.kernel.clone()],
        vec!["rootfs:".into(), vm.rootfs.display().to_string()],
        vec![
            "image:".into(),
            match &vm.image {
                Some(image) => format!("{} ({})", image.name, image.digest),
                None => "-".into(),
            },
        ],
        vec![
            "main:".into(),
            match &vm.main {
                Some(argv) => argv.join(" "),
                None => "-".into(),
            },
        ],
        vec![
            "disk:".into(),
            match vm.disk_bytes {
                Some(bytes) => format!("{} MiB (grown at create)", bytes >> 20),
                None => "as its source".into(),
            },
        ],
        vec![
            "network:".into(),
            match (&vm.network, vm.ip, &vm.mac) {
                (Some(network), ip, mac) => format!(
                    "{network}, ip {}, mac {}",
                    ip.map(|ip| ip.to_string()).unwrap_or_else(|| "-".into()),
                    mac.as_deref().unwrap_or("-")
                ),
                (None, _, _) => "none".into(),
            },
        ],
        vec![
            "restart:".into(),
            format!(
                "{} (delay {}s, max {}s), {} restarts",
                wire_name(&vm.restart_policy),
                vm.restart_delay_secs,
                vm.restart_max_delay_secs,
                vm.restart_count
            ),
        ],
        vec![
            "created:".into(),
            format!("{} ({})", vm.created_at, ago(vm.created_at, now)),
        ],
    ];
    if let Some(started) = vm.started_at {
        rows.push(vec![
            "started:".into(),
            format!("{started} ({})", ago(started, now)),
        ]);
    }
    if let Some(exit) = &vm.last_exit {
        let detail = match (exit.code, exit.signal) {
            (Some(code), _) => format!(", status {code}"),
            (_, Some(signal)) => format!(", signal {signal}"),
            _ => String::new(),
        };
        rows.push(vec![
            "last exit:".into(),
            format!("{}{detail} ({})", wire_name(&exit.kind), ago(exit.at, now)),
        ]);
    }
    if let Some(error) = &vm.error {
        rows.push(vec!["error:".into(), error.clone()]);
    }
    if let Some(degraded) = &vm.degraded {
        rows.push(vec!["degraded:".into(), degraded.clone()]);
    }
    if let Some(agent) = &vm.agent {
        let mut line = format!("{} (protocol {})", agent.version, agent.protocol);
        if let Some(note) = &agent.note {
            line.push_str(&format!(": {note}"));
        }
        rows.push(vec!["agent:".into(), line]);
    }
    table(&rows)
}

/// The lifecycle phase with what it waits for and until when.
fn vm_phase(phase: &Phase) -> String {
    let detail = match *phase {
        Phase::Launching { restart, retry, .. } => match (restart, retry) {
            (_, true) => " (killing a half-started VMM, then launching again)",
            (true, false) => " (automatic restart)",
            (false, false) => "",
        },
        Phase::Stopping { intent, killed, .. } => match (intent, killed) {
            (_, true) => " (SIGKILL sent)",
            (Intent::Restart, false) => " (restart: waiting for the guest)",
            _ => " (waiting for the guest)",
        },
        Phase::BackingOff {
            crash_loop: true, ..
        } => " (crash loop)",
        _ => "",
    };
    let name = serde_json::to_value(phase)
        .ok()
        .and_then(|v| v["phase"].as_str().map(str::to_string))
        .unwrap_or_default();
    match phase.deadline() {
        Some(at) => format!("{name}{detail}, deadline {at} ({})", until(at)),
        None => format!("{name}{detail}"),
    }
}

pub fn networks_table(networks: &[NetworkView], now: Timestamp) -> String {
    let mut rows = vec![
        [
            "NAME", "SUBNET", "GATEWAY", "BRIDGE", "NAT", "VMS", "CREATED",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for n in networks {
        rows.push(vec![
            n.record.name.clone(),
            n.record.subnet.to_string(),
            n.gateway.to_string(),
            n.record.bridge.clone(),
            if n.record.nat { "yes" } else { "no" }.into(),
            format!("{}/{}", n.leases.len(), n.capacity),
            ago(n.record.created_at, now),
        ]);
    }
    table(&rows)
}

pub fn network_details(n: &NetworkView, now: Timestamp) -> String {
    let mut rows = vec![
        vec!["name:".into(), n.record.name.clone()],
        vec!["subnet:".into(), n.record.subnet.to_string()],
        vec!["gateway:".into(), n.gateway.to_string()],
        vec!["bridge:".into(), n.record.bridge.clone()],
        vec![
            "nat:".into(),
            if n.record.nat { "yes" } else { "no" }.into(),
        ],
        vec![
            "host access:".into(),
            if n.record.host_access {
                "every host service"
            } else {
                "banger's services only"
            }
            .into(),
        ],
        vec![
            "dns:".into(),
            n.record
                .dns
                .map(|d| d.to_string())
                .unwrap_or_else(|| "none".into()),
        ],
        vec!["mtu:".into(), n.record.mtu.to_string()],
        vec![
            "created:".into(),
            format!(
                "{} ({})",
                n.record.created_at,
                ago(n.record.created_at, now)
            ),
        ],
        vec![
            "leases:".into(),
            format!("{} of {}", n.leases.len(), n.capacity),
        ],
    ];
    for lease in &n.leases {
        rows.push(vec![
            String::new(),
            format!("{} {}", lease.address, lease.vm_name),
        ]);
    }
    table(&rows)
}

/// `sha256:` and the first 12 hex digits.
pub fn short_digest(digest: &str) -> String {
    let hex = digest.trim_start_matches("sha256:");
    format!("sha256:{}", &hex[..hex.len().min(12)])
}

pub fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}

pub fn images_table(images: &[ImageRecord], now: Timestamp) -> String {
    let mut rows = vec![
        ["NAME", "DIGEST", "SIZE", "LAYERS", "CREATED", "IMPORTED"]
            .map(String::from)
            .to_vec(),
    ];
    for i in images {
        rows.push(vec![
            i.name.clone(),
            short_digest(&i.digest),
            mib(i.disk_bytes),
            i.layers.len().to_string(),
            i.created.clone().unwrap_or_else(|| "-".into()),
            ago(i.imported_at, now),
        ]);
    }
    table(&rows)
}

pub fn image_details(i: &ImageRecord, now: Timestamp) -> String {
    let list = |v: &[String]| {
        if v.is_empty() {
            "-".to_string()
        } else {
            serde_json::to_string(v).unwrap_or_default()
        }
    };
    let mut rows = vec![
        ("name", i.name.clone()),
        ("digest", i.digest.clone()),
        (
            "manifest",
            i.manifest_digest.clone().unwrap_or_else(|| "-".into()),
        ),
        ("format", crate::wire_name(&i.format)),
        (
            "disk",
            format!("{} ({})", i.disk.display(), mib(i.disk_bytes)),
        ),
        ("created", i.created.clone().unwrap_or_else(|| "-".into())),
        ("imported", ago(i.imported_at, now)),
        ("entrypoint", list(&i.config.entrypoint)),
        ("cmd", list(&i.config.cmd)),
        (
            "workdir",
            i.config.working_dir.clone().unwrap_or_else(|| "-".into()),
        ),
        ("user", i.config.user.clone().unwrap_or_else(|| "-".into())),
    ];
    for env in &i.config.env {
        rows.push(("env", env.clone()));
    }
    for layer in &i.layers {
        rows.push((
            "layer",
            format!("{} ({})", short_digest(&layer.digest), mib(layer.size)),
        ));
    }
    rows.iter()
        .map(|(key, value)| format!("{key}: {value}\n"))
        .collect()
}

pub fn kernels_table(kernels: &[KernelRecord], now: Timestamp) -> String {
    let mut rows = vec![
        ["NAME", "VERSION", "VMLINUX", "INITRD", "SHA256", "IMPORTED"]
            .map(String::from)
            .to_vec(),
    ];
    for k in kernels {
        rows.push(vec![
            k.name.clone(),
            k.version.clone().unwrap_or_else(|| "-".into()),
            k.vmlinux.display().to_string(),
            k.initrd
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "-".into()),
            k.vmlinux_sha256
                .as_deref()
                .map(|h| h[..h.len().min(12)].to_string())
                .unwrap_or_else(|| "-".into()),
            ago(k.created_at, now),
        ]);
    }
    table(&rows)
}

pub fn kernel_details(k: &KernelRecord, now: Timestamp) -> String {
    let path = |p: &Option<std::path::PathBuf>| {
        p.as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "-".into())
    };
    let mut rows = vec![
        ("name", k.name.clone()),
        ("version", k.version.clone().unwrap_or_else(|| "-".into())),
        ("vmlinux", k.vmlinux.display().to_string()),
        ("bzimage", path(&k.bzimage)),
        ("initrd", path(&k.initrd)),
        ("modules", k.modules.len().to_string()),
        (
            "boot image",
            k.boot_image
                .as_ref()
                .map(|b| {
                    let agent = &b.agent_sha256[..b.agent_sha256.len().min(12)];
                    format!("{} (agent {agent})", b.path.display())
                })
                .unwrap_or_else(|| "- (built at the first start)".into()),
        ),
        ("imported", ago(k.created_at, now)),
    ];
    if let Some(note) = &k.note {
        rows.push(("note", note.clone()));
    }
    rows.iter()
        .map(|(key, value)| format!("{key}: {value}\n"))
        .collect()
}

pub fn json(value: &impl Serialize) -> String {
    serde_json::to_string_pretty(value).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
}

/// What `image rm` and `image prune` removed and freed.
pub fn images_removed(removed: &ImagesRemoved) -> String {
    let mut out = String::new();
    for image in &removed.images {
        out.push_str(&format!(
            "removed {} {}\n",
            image.name,
            short_digest(&image.digest)
        ));
    }
    if !removed.held_by.is_empty() {
        out.push_str(&format!(
            "VM {} keep their own disks\n",
            removed.held_by.join(", VM ")
        ));
    }
    out.push_str(&format!(
        "freed {:.1} MiB\n",
        removed.freed_bytes as f64 / f64::from(1 << 20)
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns() {
        let out = table(&[
            vec!["NAME".into(), "STATE".into()],
            vec!["a-long-name".into(), "running".into()],
        ]);
        assert_eq!(out, "NAME         STATE\na-long-name  running\n");
    }

    #[test]
    fn relative_times_pick_one_unit() {
        let now = Timestamp::from_second(1_000_000).expect("ts");
        let at = |s: i64| Timestamp::from_second(1_000_000 - s).expect("ts");
        assert_eq!(ago(at(0), now), "just now");
        assert_eq!(ago(at(42), now), "42s ago");
        assert_eq!(ago(at(301), now), "5m ago");
        assert_eq!(ago(at(3 * 3600 + 5), now), "3h ago");
        assert_eq!(ago(at(2 * 86_400), now), "2d ago");
    }

    #[test]
    fn progress_shows_a_percentage_when_the_total_is_known() {
        assert_eq!(
            progress("copying", Some(120), Some(400)),
            "copying 120/400 (30%)"
        );
        assert_eq!(progress("starting", None, None), "starting");
        assert_eq!(duration(3723), "1h 2m 3s");
    }
}
