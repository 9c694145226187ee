//! `banger vm`: create, start, stop, inspect, remove VMs (exec and
//! logs --follow stream through `exec.rs`).

use super::*;
use crate::cli::args::{RestartChoice, VmmChoice};

pub(super) fn run(client: &mut Client, command: VmCommand, now: Timestamp) -> Result<(), Failure> {
    let simple =
        |client: &mut Client, method: &str, params: serde_json::Value| -> Result<(), Failure> {
            let vm = client.call::<VmResult>(method, params)?;
            println!("{} {}", vm.result.vm.name, output::vm_state(&vm.result.vm));
            Ok(())
        };
    match command {
        VmCommand::Create {
            name,
            kernel,
            rootfs,
            image,
            disk,
            run_image_cmd,
            vcpus,
            memory,
            restart,
            restart_delay,
            restart_max_delay,
            vmm,
            network,
            no_network,
            start,
            json,
        } => {
            let (restart, vmm) = (restart.map(restart_mode), vmm.map(vmm_kind));
            let params = json!({
                "name": name, "kernel": kernel, "rootfs": rootfs.as_deref().map(absolute).transpose()?,
                "image": image, "disk": disk, "run_image_cmd": run_image_cmd, "vcpus": vcpus, "memory": memory,
                "restart": restart, "restart_delay_secs": restart_delay, "restart_max_delay_secs": restart_max_delay,
                "vmm": vmm, "network": network, "no_network": no_network, "start": start,
            });
            let vm = client.call::<VmResult>("vm.create", params)?;
            if json {
                println!("{}", output::json(&vm.result.vm));
            } else {
                println!("{}", vm.result.vm.name);
            }
        }
        VmCommand::Start { name } => simple(client, "vm.start", json!({"name": name}))?,
        VmCommand::Stop { name, timeout } => simple(
            client,
            "vm.stop",
            json!({"name": name, "timeout_secs": timeout}),
        )?,
        VmCommand::Kill { name } => simple(client, "vm.kill", json!({"name": name}))?,
        VmCommand::Restart { name, timeout } => simple(
            client,
            "vm.restart",
            json!({"name": name, "timeout_secs": timeout}),
        )?,
        VmCommand::Rm { name, force } => {
            client.call::<VmResult>("vm.remove", json!({"name": name, "force": force}))?;
            println!("{name} removed");
        }
        VmCommand::Forget { id } => {
            client.call::<ForgetResult>("vm.forget", json!({"id": id}))?;
            println!("{id} forgotten");
        }
        VmCommand::Ls { json: true } => {
            // Passed through as the daemon wrote it: no parse of every VM.
            #[derive(serde::Deserialize)]
            struct RawVms<'a> {
                #[serde(borrow)]
                vms: &'a serde_json::value::RawValue,
                store_unavailable: Option<String>,
            }
            let raw = client.call_raw("vm.list", json!({}), |_| {})?;
            let vms: RawVms<'_> = serde_json::from_str(raw.get())
                .map_err(|e| Failure::Daemon(format!("bangerd sent an unexpected answer: {e}")))?;
            warn_from_memory(vms.store_unavailable.as_deref());
            println!("{}", vms.vms.get());
        }
        VmCommand::Ls { json: false } => {
            let vms = client.call::<VmsResult>("vm.list", json!({}))?;
            warn_from_memory(vms.result.store_unavailable.as_deref());
            print!("{}", output::vms_table(&vms.result.vms, now));
        }
        VmCommand::Inspect { name, json } => {
            let vm = client.call::<VmResult>("vm.get", json!({"name": name}))?;
            warn_from_memory(vm.result.store_unavailable.as_deref());
            show(json, &vm.result.vm, |v| output::vm_details(v, now));
        }
        // Taken by `run`: it needs the connection to itself.
        VmCommand::Exec { .. } => {}
        VmCommand::Ping { name, wait, json } => {
            let ping =
                client.call::<PingResult>("vm.ping", json!({"name": name, "wait_secs": wait}))?;
            if json {
                println!("{}", output::json(&ping));
            } else {
                let p = ping.result;
                println!(
                    "{name}: agent {} answered in {:.2} ms; kernel {}, hostname {}, ready {} ms after boot",
                    p.agent_version, p.round_trip_ms, p.kernel, p.hostname, p.boot.ready_ms
                );
            }
        }
        // `--follow` was taken by `run`: it needs the connection to itself.
        VmCommand::Logs { name, tail, .. } => {
            let logs = client.call::<LogsResult>("vm.logs", json!({"name": name, "tail": tail}))?;
            print!("{}", logs.result.text);
        }
    }
    Ok(())
}

fn restart_mode(choice: RestartChoice) -> RestartMode {
    match choice {
        RestartChoice::No => RestartMode::No,
        RestartChoice::OnFailure => RestartMode::OnFailure,
        RestartChoice::Always => RestartMode::Always,
    }
}

fn vmm_kind(choice: VmmChoice) -> VmmKind {
    match choice {
        VmmChoice::Firecracker => VmmKind::Firecracker,
        VmmChoice::Qemu => VmmKind::Qemu,
    }
}
