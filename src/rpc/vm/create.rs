//! `vm.create` checked whole before anything is made: the name, sizes,
//! kernel, image and network resolved, the root disk opened as the caller
//! last.

use super::{MemoryArg, VmCreateParams, VmServices};
use crate::actors::catalog::{ChooseKernel, FindImage, ImageError};
use crate::actors::netns::Resolve;
use crate::actors::vm::CreateVm;
use crate::disk::DiskSource;
use crate::error_chain;
use crate::image::Lookup;
use crate::rpc::protocol::{ErrorCode, RpcError};
use crate::rpc::wire::Wire;
use crate::vm::record::VmImage;
use crate::vm::{
    InvalidVm, generate_name, parse_disk_bytes, parse_memory_mib, validate_name, validate_rootfs,
    validate_vcpus,
};

/// Validates a create, then opens its root disk as the caller, last, so a
/// refused request opens nothing.
pub(super) async fn validate_create(
    services: &VmServices,
    wire: &Wire<'_>,
    params: VmCreateParams,
) -> Result<CreateVm, RpcError> {
    let name = params.name.unwrap_or_else(generate_name);
    validate_name("name", &name)?;
    if let Some(kernel) = &params.kernel {
        validate_name("kernel", kernel)?;
    }
    let rootfs = params.rootfs.as_deref().map(validate_rootfs).transpose()?;
    let disk_bytes = params.disk.as_deref().map(parse_disk_bytes).transpose()?;
    if let Some(bytes) = disk_bytes
        && bytes > services.settings.max_rootfs.bytes
    {
        return Err(InvalidVm {
            field: "disk",
            reason: format!(
                "{bytes} bytes is more than the {} allowed ({})",
                services.settings.max_rootfs.bytes, services.settings.max_rootfs.setting
            ),
        }
        .into());
    }
    let vcpus = validate_vcpus(params.vcpus.unwrap_or(1))?;
    let memory_mib = match params.memory {
        None => 512,
        Some(MemoryArg::Mib(mib)) => parse_memory_mib(&mib.to_string())?,
        Some(MemoryArg::Size(text)) => parse_memory_mib(&text)?,
    };
    let seconds = |field: &'static str, value: Option<f64>| {
        value
            .map(|s| crate::config::seconds_to_ms(field, s))
            .transpose()
            .map_err(|e| {
                RpcError::new(
                    ErrorCode::InvalidParams,
                    format!("invalid params: {}", error_chain(&e)),
                )
            })
    };
    let restart_delay_ms = seconds("restart_delay_secs", params.restart_delay_secs)?;
    let restart_max_delay_ms = seconds("restart_max_delay_secs", params.restart_max_delay_secs)?;
    let defaults = services.settings.restart_defaults;
    if restart_max_delay_ms.unwrap_or(defaults.max_delay_ms)
        < restart_delay_ms.unwrap_or(defaults.delay_ms)
    {
        return Err(InvalidVm {
            field: "restart_max_delay_secs",
            reason: "is shorter than the restart delay".into(),
        }
        .into());
    }
    // Resolved before anything is opened: a network that cannot be had
    // fails the create at once, naming why.
    let network = services
        .networks
        .send(Resolve {
            network: params.network,
            none: params.no_network,
        })
        .await??;
    let kernel = match params.kernel {
        Some(kernel) => kernel,
        None => services
            .catalog
            .send(ChooseKernel {
                preferred: services.settings.default_kernel.clone(),
            })
            .await
            .map_err(|_| RpcError::new(ErrorCode::Unavailable, "the catalog is not answering"))??,
    };
    // Opened last, so a refused request opens nothing: the user's file
    // with the caller's authority, an image's disk (the daemon's own,
    // never written) by the daemon.
    let (rootfs, image, main) = match (rootfs, params.image) {
        (Some(rootfs), _) => {
            let opened = wire
                .open_named("rootfs", &rootfs, services.settings.max_rootfs)
                .await?;
            (DiskSource::from(opened), None, None)
        }
        (None, Some(wanted)) => {
            let image = services
                .catalog
                .send(FindImage(wanted))
                .await
                .map_err(|_| {
                    RpcError::new(ErrorCode::Unavailable, "the catalog is not answering")
                })??;
            crate::fault::pause("image-found").await;
            let disk = image.disk.clone();
            let file = tokio::task::spawn_blocking(move || std::fs::File::open(&disk))
                .await
                .map_err(|_| RpcError::new(ErrorCode::Unavailable, "blocking pool gone"))?
                .map_err(|e| match e.kind() {
                    // `image rm` won the race since the image was found.
                    std::io::ErrorKind::NotFound => {
                        RpcError::from(ImageError::Lookup(Lookup::NotFound(image.name.clone())))
                    }
                    _ => RpcError::new(
                        ErrorCode::Internal,
                        format!(
                            "cannot open image {}'s disk {}: {e}",
                            image.name,
                            image.disk.display()
                        ),
                    ),
                })?;
            crate::fault::pause("image-opened").await;
            let source = DiskSource {
                named: image.disk.clone(),
                file: file.into(),
                len: image.disk_bytes,
                from_caller: false,
            };
            let main = match params.run_image_cmd {
                true if image.config.entrypoint.is_empty() && image.config.cmd.is_empty() => {
                    return Err(RpcError::invalid_params(
                        "run_image_cmd",
                        format!("image {} sets no Entrypoint or Cmd", image.name),
                    ));
                }
                true => Some(image.config.clone()),
                false => None,
            };
            let held = VmImage {
                name: image.name,
                digest: image.digest,
            };
            (source, Some(held), main)
        }
        (None, None) => return Err(RpcError::invalid_params("rootfs", "no root disk given")),
    };
    if let Some(bytes) = disk_bytes
        && bytes < rootfs.len
    {
        return Err(InvalidVm {
            field: "disk",
            reason: format!(
                "{bytes} bytes is smaller than the {} of {}: a root disk can grow, not shrink",
                rootfs.len,
                rootfs.named.display()
            ),
        }
        .into());
    }
    Ok(CreateVm {
        network,
        name,
        kernel,
        rootfs,
        image,
        disk_bytes,
        main,
        vcpus,
        memory_mib,
        vmm: params.vmm,
        restart: params.restart,
        restart_delay_ms,
        restart_max_delay_ms,
        start: params.start,
    })
}
