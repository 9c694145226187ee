//! `banger kernel`: import, list and remove kernels.

use super::*;

#[derive(Subcommand)]
pub(super) enum KernelCommand {
    /// Copy a vmlinux (and initrd) into the catalog under NAME.
    Import {
        name: String,
        #[arg(long)]
        vmlinux: PathBuf,
        #[arg(long)]
        initrd: Option<PathBuf>,
        /// Kernel command line [default: the backend's, see docs/cli.md].
        #[arg(long)]
        cmdline: Option<String>,
    },
    /// Import a Debian kernel package (linux-image-*.deb) under NAME: its
    /// bzImage, the vmlinux inside it, and an initramfs of the virtio and
    /// vsock modules (banger-agent joins it at boot).
    ImportDeb {
        name: String,
        /// The .deb file (`apt-get download linux-image-<version>-cloud-amd64`).
        path: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Every kernel in the catalog.
    #[command(alias = "list")]
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// One kernel in detail: its files, notes and boot image.
    Inspect {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Remove a kernel no VM uses.
    #[command(alias = "remove")]
    Rm { name: String },
}

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
