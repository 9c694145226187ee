//! The `vm.*` methods' params, each checked at the boundary (`Params`).

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::rpc::protocol::{Params, RpcError, check_wait};
use crate::vm::record::VmmKind;
use crate::vm::restart::RestartMode;
use crate::vm::validate_name;

/// `--memory`: MiB as a number, or a size such as "512M" or "2G".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum MemoryArg {
    Mib(u64),
    Size(String),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmCreateParams {
    /// Generated (`adjective-noun`) when absent.
    #[serde(default)]
    pub name: Option<String>,
    /// Default: `vm.default_kernel`, else the only kernel in the catalog.
    #[serde(default)]
    pub kernel: Option<String>,
    /// The root disk: a user's ext4 file, or an image (one of the two).
    #[serde(default)]
    pub rootfs: Option<PathBuf>,
    /// An image's name, digest or unique digest prefix.
    #[serde(default)]
    pub image: Option<String>,
    /// The root disk's size (`1G`, `512M`): grown before the first boot.
    #[serde(default)]
    pub disk: Option<String>,
    /// Run the image's Entrypoint and Cmd as the VM's main process.
    #[serde(default)]
    pub run_image_cmd: bool,
    #[serde(default)]
    pub vcpus: Option<u8>,
    #[serde(default)]
    pub memory: Option<MemoryArg>,
    #[serde(default)]
    pub restart: Option<RestartMode>,
    #[serde(default)]
    pub restart_delay_secs: Option<f64>,
    #[serde(default)]
    pub restart_max_delay_secs: Option<f64>,
    #[serde(default)]
    pub vmm: Option<VmmKind>,
    /// The network to join (default: `default`, when networking is on).
    #[serde(default)]
    pub network: Option<String>,
    /// No network at all.
    #[serde(default)]
    pub no_network: bool,
    #[serde(default)]
    pub start: bool,
}

impl Params for VmCreateParams {
    fn validate(&self) -> Result<(), RpcError> {
        match (&self.rootfs, &self.image) {
            (Some(_), Some(_)) => {
                return Err(RpcError::invalid_params(
                    "image",
                    "cannot be given with rootfs: the root disk is one or the other",
                ));
            }
            (None, None) => {
                return Err(RpcError::invalid_params(
                    "rootfs",
                    "give a root disk: rootfs (an ext4 file) or image (an imported image)",
                ));
            }
            _ => {}
        }
        if self.run_image_cmd && self.image.is_none() {
            return Err(RpcError::invalid_params(
                "run_image_cmd",
                "needs image: a root disk file has no command to run",
            ));
        }
        if let Some(network) = &self.network {
            validate_name("network", network)?;
            if self.no_network {
                return Err(RpcError::invalid_params(
                    "no_network",
                    "cannot be given with network",
                ));
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmRef {
    pub name: String,
}

impl Params for VmRef {}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmStopParams {
    pub name: String,
    /// Seconds to wait for the guest before SIGKILL (default 30).
    #[serde(default)]
    pub timeout_secs: Option<f64>,
}

impl Params for VmStopParams {}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmForgetParams {
    /// The quarantined record's key: the VM's id.
    pub id: String,
}

impl Params for VmForgetParams {}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmRemoveParams {
    pub name: String,
    /// Stop (kill) a running VM first.
    #[serde(default)]
    pub force: bool,
}

impl Params for VmRemoveParams {}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmLogsParams {
    pub name: String,
    /// Only the last N lines.
    #[serde(default)]
    pub tail: Option<usize>,
    /// Keep sending new output: the connection becomes a byte stream.
    #[serde(default)]
    pub follow: bool,
}

impl Params for VmLogsParams {}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmExecParams {
    pub name: String,
    /// The program and its arguments; the program is looked up in the
    /// guest's PATH.
    pub argv: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub cwd: Option<String>,
    /// A pseudo-terminal (not yet served).
    #[serde(default)]
    pub tty: bool,
    /// How long to wait for the agent of a VM that is still booting (default 60).
    #[serde(default)]
    pub wait_secs: Option<f64>,
}

impl Params for VmExecParams {
    fn validate(&self) -> Result<(), RpcError> {
        if self.argv.is_empty() || self.argv[0].is_empty() {
            return Err(RpcError::invalid_params("argv", "must name a program"));
        }
        if self.tty {
            return Err(RpcError::invalid_params(
                "tty",
                "a pseudo-terminal is not served yet; run without -t",
            ));
        }
        if let Some(key) = self.env.keys().find(|k| k.is_empty() || k.contains('=')) {
            return Err(RpcError::invalid_params(
                "env",
                format!("{key:?} is not a variable name"),
            ));
        }
        check_wait("wait_secs", self.wait_secs)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmPingParams {
    pub name: String,
    /// How long to wait for the agent of a VM that is still booting (default 60).
    #[serde(default)]
    pub wait_secs: Option<f64>,
}

impl Params for VmPingParams {
    fn validate(&self) -> Result<(), RpcError> {
        check_wait("wait_secs", self.wait_secs)
    }
}
