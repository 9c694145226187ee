//! `banger kernel`: import, list and remove kernels.

use super::*;

pub(super) fn run(
    client: &mut Client,
    command: KernelCommand,
    now: Timestamp,
) -> Result<(), Failure> {
    match command {
        KernelCommand::Import {
            name,
            vmlinux,
            initrd,
            cmdline,
        } => {
            let initrd = initrd.as_deref().map(absolute).transpose()?;
            let params = json!({"name": name, "vmlinux": absolute(&vmlinux)?, "initrd": initrd, "cmdline": cmdline});
            let kernel = client
                .call::<KernelResult>("kernel.import", params)?
                .result
                .kernel;
            if let Some(note) = &kernel.note {
                eprintln!("note: {}: {note}", kernel.name);
            }
            println!("{}", kernel.name);
        }
        KernelCommand::ImportDeb { name, path, json } => {
            let params = json!({"name": name, "path": absolute(&path)?});
            let mut stderr = std::io::stderr();
            let kernel =
                client.call_with_progress::<KernelResult>("kernel.import_deb", params, |p| {
                    let _ = writeln!(stderr, "{}", output::progress(&p.phase, p.current, p.total));
                })?;
            let kernel = kernel.result.kernel;
            if json {
                println!("{}", output::json(&kernel));
            } else {
                println!(
                    "{} {} ({} modules in the initramfs)",
                    kernel.name,
                    kernel.version.as_deref().unwrap_or("?"),
                    kernel.modules.len()
                );
            }
        }
        KernelCommand::Ls { json } => {
            let kernels = client.call::<KernelsResult>("kernel.list", json!({}))?;
            show(json, &kernels.result.kernels, |v| {
                output::kernels_table(v, now)
            });
        }
        KernelCommand::Inspect { name, json } => {
            let kernels = client.call::<KernelsResult>("kernel.list", json!({}))?;
            let Some(kernel) = kernels.result.kernels.into_iter().find(|k| k.name == name) else {
                return Err(Failure::Daemon(format!(
                    "no kernel named {name}; `banger kernel ls` lists them"
                )));
            };
            show(json, &kernel, |v| output::kernel_details(v, now));
        }
        KernelCommand::Rm { name } => {
            client.call::<KernelResult>("kernel.remove", json!({"name": name}))?;
            println!("{name} removed");
        }
    }
    Ok(())
}
